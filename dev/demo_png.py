"""The README's picture: a demo run's last sample grid above its loss plot, as one small PNG.

    python train.py && python dev/demo_png.py out/demo docs/demo.png
"""
import glob
import os
import sys

from PIL import Image


def main(run: str, png: str):
    grid = Image.open(sorted(glob.glob(os.path.join(run, "samples", "step-*", "grid.png")))[-1]).convert("RGB")
    loss = Image.open(os.path.join(run, "loss.png")).convert("RGB")
    loss = loss.resize((grid.width, round(loss.height * grid.width / loss.width)), Image.LANCZOS)
    out = Image.new("RGB", (grid.width, grid.height + loss.height), "white")
    out.paste(grid, (0, 0))
    out.paste(loss, (0, grid.height))
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    out.quantize(256).save(png, optimize=True)  # a palette: the picture stays a few tens of KB
    print(f"{png}: {out.width}x{out.height}, {os.path.getsize(png) / 1024:.0f} KB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
