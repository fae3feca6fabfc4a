"""Reads a TensorBoard log directory with the tensorboard package's own
event reader (EventAccumulator, which also applies TensorBoard's purge of
orphaned steps) and prints {"scalars": {tag: [[step, value], ...]},
"texts": {tag: [[step, text], ...]}} as JSON, for tests/train.rs."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "texts": {}}
for tag in tags["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
for tag in tags["tensors"]:
    out["texts"][tag] = [[e.step, e.tensor_proto.string_val[0].decode("utf-8")] for e in acc.Tensors(tag)]
json.dump(out, sys.stdout)
