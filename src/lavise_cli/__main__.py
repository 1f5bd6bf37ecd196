from lavise_cli.cli import main

main()
