"""Nav1D, the toy task of "Maximize Your Diffusion" (specification and code: common/nav1d.py): make one of its
datasets, print its statistics and reference returns, and draw the task with sample episodes.

    python nav1d.py --dataset full --figure runs/nav1d-full.png
"""
from common.nav1d import Args, main
from common.runtime import cli

if __name__ == "__main__":
    cli(main, Args)
