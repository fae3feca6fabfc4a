"""The original's document split, for tests/split.rs to compare with.

get_split is configure_data.py's and split_ds's cut is
data_utils/datasets.py's (THUDM/GLM), with the arguments object and the
dataset wrappers taken out; the shuffle is theirs: numpy's legacy
np.random.RandomState(1234).shuffle over np.arange(n).

Reads {"permutations": [n, ...], "cases": [{"n", "split", "valid", "test"}],
"npy": path, "npy_n": n, "load": path} as JSON on stdin; writes the
permutations, each case's train/valid/test indices (or its error), the
permutation of npy_n saved with np.save to `npy`, and the array np.load reads
from `load` (when given) as JSON on stdout.
"""
import json
import sys

import numpy as np


class Args:
    def __init__(self, split, valid_data, test_data):
        self.split = split
        self.valid_data = valid_data
        self.test_data = test_data


def get_split(args):
    """
    Get dataset splits from comma separated string list
    """
    splits = []
    if args.split.find(',') != -1:
        splits = [float(s) for s in args.split.split(',')]
    elif args.split.find('/') != -1:
        splits = [float(s) for s in args.split.split('/')]
    else:
        splits = [float(args.split)]
    split_total = sum(splits)
    if split_total < 1.:
        splits.append(1 - split_total)
    while len(splits) < 3:
        splits.append(0.)
    splits = splits[:3]
    if args.valid_data is not None:
        splits[1] = 0.
    if args.test_data is not None:
        splits[2] = 0.
    final_sum = sum(splits)
    return [s / final_sum for s in splits]


def should_split(split):
    return max(split) / sum(split) != 1.


def split_ds(ds_len, split, shuffle=True):
    """split_ds on indices: the lists SplitDataset would hold (None: no split)."""
    split_sum = sum(split)
    if split_sum == 0:
        raise Exception('Split cannot sum to 0.')
    split = np.array(split)
    split /= split_sum
    inds = np.arange(ds_len)
    if shuffle:
        rng = np.random.RandomState(1234)
        rng.shuffle(inds)
    start_idx = 0
    residual_idx = 0
    rtn_ds = [None] * len(split)
    for i, f in enumerate(split):
        if f != 0:
            proportion = ds_len * split[i]
            residual_idx += proportion % 1
            split_ = int(int(proportion) + residual_idx)
            split_inds = inds[start_idx:start_idx + max(split_, 1)]
            rtn_ds[i] = split_inds.tolist()
            start_idx += split_
            residual_idx %= 1
    return rtn_ds


def main():
    req = json.load(sys.stdin)
    out = {"permutations": [], "cases": []}
    for n in req["permutations"]:
        inds = np.arange(n)
        np.random.RandomState(1234).shuffle(inds)
        out["permutations"].append(inds.tolist())
    for case in req["cases"]:
        args = Args(case["split"], case["valid"], case["test"])
        split = get_split(args)
        if should_split(split):
            parts = split_ds(case["n"], split)
        else:
            parts = [list(range(case["n"])), None, None]
        out["cases"].append([p if p is not None else [] for p in parts])
    inds = np.arange(req["npy_n"])
    np.random.RandomState(1234).shuffle(inds)
    np.save(req["npy"], inds)
    if req.get("load"):
        out["loaded"] = np.load(req["load"]).tolist()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
