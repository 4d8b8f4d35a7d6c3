"""``mmalign train`` with a deliberate bug: the UNet is never wrapped for DDP, so gradients are not
all-reduced and each process steps on its own slice (the bug of DanceGRPO #110). The two-process test runs it
to show that its tolerances catch a wrongly split global batch."""

import sys

import accelerate

accelerate.Accelerator.prepare_model = lambda self, model, *args, **kwargs: model

from mmalign.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
