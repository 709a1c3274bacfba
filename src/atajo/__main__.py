from atajo.cli.main import main

main()
