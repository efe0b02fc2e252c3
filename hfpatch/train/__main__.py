"""``python -m hfpatch.train MODEL ...``: the entry point torchrun workers use."""

if __name__ == "__main__":
    from .launch import prepare_worker

    prepare_worker()
    from .command import train

    train.main(prog_name="hfpatch train")
