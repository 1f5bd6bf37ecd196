"""``python -m lavise_cli`` (and ``torchrun -m lavise_cli``): the command line."""

from lavise_cli.cli import main

if __name__ == "__main__":  # not when a worker process (spawn, forkserver) imports this module
    main()
