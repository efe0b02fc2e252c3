"""``python -m hfpatch.train MODEL ...``: the entry point torchrun workers use."""

from .command import train

if __name__ == "__main__":
    train.main(prog_name="hfpatch train")
