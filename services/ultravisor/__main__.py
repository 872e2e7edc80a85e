from services.ultravisor.server import main

main()
