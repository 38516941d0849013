"""A tiny random checkpoint with the test suite's byte-level tokenizer, for `run.sh` (run from a
checkout's root: it uses that checkout's tests/ helpers).

    python3 experiments/records/make_tiny.py OUT_DIR
"""

import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path.cwd() / "tests"))

import safetensors.numpy
import svf_tiny
import tiny

MODEL = dataclasses.replace(svf_tiny.CONFIG, vocab_size=tiny.VOCAB_SIZE)

if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(svf_tiny.hf_config(MODEL)))
    tensors = svf_tiny.random_tensors(MODEL, seed=0)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    tiny.tiny_tokenizer().save_pretrained(out)
