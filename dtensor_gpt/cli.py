"""
What the command lines share: every option's default in --help, value checks argparse runs
before anything starts, one error per job instead of one per torchrun rank, and no DTensor
notes a user cannot act on.
"""

import argparse
import logging
import math
import os
import time
import warnings


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's help followed by its default, unless the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.required or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a flag: the default is not giving it
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """
    argparse's parser with `HelpFormatter`, quiet on every torchrun rank but 0: a bad argument
    (found alike on every rank) is one usage and error message for the job, exit status 2.
    A quiet rank waits up to 10 s before it exits: torchrun stops the whole job when the first
    rank exits, and a quiet rank that won the race would end rank 0 before it said why.
    """

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self.speaks = os.environ.get("RANK", "0") == "0"

    def print_usage(self, file=None):
        if self.speaks:
            super().print_usage(file)

    def print_help(self, file=None):
        if self.speaks:
            super().print_help(file)

    def exit(self, status=0, message=None):
        if status and not self.speaks:
            time.sleep(10)
        super().exit(status, message if self.speaks else None)


def integer(low, high=None):
    """An argparse type: a whole number from `low` to `high` (or any above `low`)."""
    bounds = f"of at least {low}" if high is None else f"from {low} to {high}"

    def check(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {bounds}")
        return value

    return check


def number(above=None, at_least=None, below=None):
    """An argparse type: a finite number above `above` (or at least `at_least`) and below `below`."""
    bounds = [f"above {above}" if above is not None else f"of at least {at_least}" if at_least is not None else "",
              f"below {below}" if below is not None else ""]
    bounds = " and ".join(b for b in bounds if b)

    def check(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (not math.isfinite(value) or (above is not None and value <= above)
                or (at_least is not None and value < at_least) or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {bounds}".rstrip())
        return value

    return check


def add_compress_argument(parser):
    from dtensor_gpt.compress import MODES

    parser.add_argument("--compress", choices=MODES,
                        help="send the blocks' row-parallel sums as bf16 or int8, summed in float32, with plans "
                             "megatron and spd (default: float32 all-reduces)")


def plan_options(plan, spd_blocks, compress, chunks=None):
    """The named plan's options from --spd-blocks, --compress and --chunks."""
    from plans.spd import spd_blocks_from_text

    options = dict(spd_blocks=spd_blocks_from_text(spd_blocks)) if plan == "spd" else {}
    options.update(dict(chunks=chunks) if plan == "megatron-overlap" and chunks else {})
    return {**options, "compress": compress} if compress else options


def _not_alltoall_fallback(record):
    return "does not support alltoall" not in record.getMessage()


def _not_sequential_all_reduces(record):
    return "sequential all_reduce operations will be performed" not in record.getMessage()


def quiet_dtensor_notes():
    """Silence, by their text, three notes DTensor prints on this project's plans; each is harmless."""
    # megatron-sp: the model's last-position index, x[:, [-1], :], meets a sequence-sharded DTensor, which
    # takes the one-element index tensor as replicated; it is the same index on every rank, so that is right.
    warnings.filterwarnings("ignore", "Found a non-scalar tensor with numel=1", UserWarning)
    # For that index DTensor may move shards with an all-to-all, which gloo lacks; it all-gathers and
    # keeps its chunk instead, the same values.
    logging.getLogger("torch.distributed.tensor._collective_utils").addFilter(_not_alltoall_fallback)
    # With a (dp, tp) mesh, the gradient norm (dtensor_gpt.grad) is summed by one all-reduce per mesh
    # dimension where a flattened mesh would need one: a scalar per parameter, the same sum on every rank.
    logging.getLogger("torch.distributed.tensor._redistribute").addFilter(_not_sequential_all_reduces)
