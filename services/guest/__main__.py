from services.guest.server import main

main()
