from nac_server.cli import main

main()
