"""Where the GPU time of `hfpatch train`'s own steps goes: the real trainer (FSDP2, optimizer, clip, syncs),
with steps FIRST..LAST under the torch profiler; the same report as `bench_packing.py --profile`.

    python scripts/profile_trainer.py --out trainer_profile.json --profile-steps 8 9 -- llama2 --steps 9 ...

Everything after ``--`` is `hfpatch train`'s command line (a run dir with checkpoints off is advised).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_packing import step_profile, write_report  # noqa: E402


def profile_trainer_steps(first: int, last: int, out: str, command: list[str]):
    """Wraps the trainer's step so steps first..last run under the profiler; the report goes to ``out`` after step last.
    Returns a function that stops the profiler if the run ended inside the window (a live profiler crashes at exit)."""
    from torch.profiler import ProfilerActivity, profile

    from hfpatch.train import loop

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    running = []
    step_seconds = []
    one_step = loop._Trainer.one_step

    def profiled_step(trainer):
        step = trainer.state.step + 1
        if step == first:
            prof.start()
            running.append(True)
        record = one_step(trainer)  # ends with a device synchronize
        if first <= step <= last:
            step_seconds.append(record["step_time_s"])
        if step == last:
            prof.stop()
            running.clear()
            card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            write_report(out, {"card": card, "torch": torch.__version__, "command": command,
                               **step_profile(prof, last - first + 1, sum(step_seconds))})
            print(f"profile of steps {first}-{last} in {out}", flush=True)
        return record

    loop._Trainer.one_step = profiled_step
    return lambda: running and prof.stop()


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile-steps", type=int, nargs=2, default=(8, 9), metavar=("FIRST", "LAST"))
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    first, last = args.profile_steps
    if not 1 <= first <= last:
        parser.error("--profile-steps wants 1 <= FIRST <= LAST")
    if not command:
        parser.error("give `hfpatch train`'s arguments after -- (e.g. -- llama2 --steps 9)")
    import click

    from hfpatch.cli import main as hfpatch_main

    if os.path.exists(args.out):
        os.remove(args.out)  # what is there after the run is this run's profile
    stop_profiler = profile_trainer_steps(first, last, args.out, command)
    try:
        hfpatch_main(["train", *command], standalone_mode=False)
    except click.ClickException as exc:  # a bad `hfpatch train` argument: click's one line, as the CLI prints it
        exc.show()
        sys.exit(exc.exit_code)
    finally:
        stop_profiler()
    if not os.path.exists(args.out):
        sys.exit(f"the run ended before step {last}: no profile (give it --steps {last} or more)")


if __name__ == "__main__":
    main()
