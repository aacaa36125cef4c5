"""Rebuild the bundled sample: a stratified subset of the real MNIST and Fashion-MNIST CSVs.

python data/make_sample.py SOURCE_DIR   (SOURCE_DIR holds the full Kaggle-layout .csv.gz files)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402

TRAIN_PER_CLASS = 400  # 4,000 training images per dataset
TEST_PER_CLASS = 100   # 1,000 test images per dataset
SEED = 0


def stratified(labels, per_class, generator):
    """per_class random rows of every class, kept in the file's order."""
    rows = [torch.nonzero(labels == c).flatten() for c in range(10)]
    picked = [r[torch.randperm(len(r), generator=generator)[:per_class]] for r in rows]
    return torch.cat(picked).sort().values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the full mnist_*.csv.gz and fashion-mnist_*.csv.gz")
    source = Path(parser.parse_args().source)
    out = Path(__file__).resolve().parent / utils.SAMPLE_DIR
    generator = torch.Generator().manual_seed(SEED)
    for name in ("mnist", "fashion"):
        for file, per_class in zip(utils.DATASETS[name].files, (TRAIN_PER_CLASS, TEST_PER_CLASS)):
            images, labels = utils.read_kaggle_csv(utils._find(source, file), 10)
            keep = stratified(labels, per_class, generator)
            utils.write_kaggle_csv(out / f"{file}.gz", images[keep], labels[keep])
            print(f"{out / file}.gz: {len(keep)} rows")


if __name__ == "__main__":
    main()
