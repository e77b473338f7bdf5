"""`python -m ggufjac COMMAND ...`: the same commands as the `ggufjac` script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="ggufjac")
