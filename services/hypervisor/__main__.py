from services.hypervisor.server import main

main()
