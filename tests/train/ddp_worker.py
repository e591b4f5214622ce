"""torchrun worker for test_loop.py: trains the tiny model a few steps under DDP (gloo, CPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _tiny import make_cfg, mse_loss, tiny_dataset, tiny_model  # noqa: E402

from snce.train import Trainer, cleanup_distributed  # noqa: E402


def main(out_dir: str, grad_accum: int) -> None:
    cfg = make_cfg(out_dir, steps=3, grad_accum=grad_accum, ckpt_every=100, warmup_steps=1)
    Trainer(tiny_model(), mse_loss, tiny_dataset(), cfg).fit()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
