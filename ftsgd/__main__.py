"""``python -m ftsgd`` runs the same CLI as the ``ftsgd`` console script."""

from ftsgd.cli.main import main

if __name__ == "__main__":
    main()
