"""``python -m mha2mla`` (also what ``accelerate launch -m mha2mla heal ...`` runs)."""

from mha2mla.cli.main import main

if __name__ == "__main__":
    main()
