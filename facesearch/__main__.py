"""``python -m facesearch ...``: the same command line as the ``facesearch`` script."""

from facesearch.cli import main

if __name__ == "__main__":
    main()
