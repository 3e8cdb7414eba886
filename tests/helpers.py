"""What tests share besides fixtures: the checkout's paths, a loopback shard server with scripted faults,
the small training hyperparameters, and Snakemake run on this checkout (pytest's advice: a helpers
module, imported by name, rather than conftest imported as a module)."""

import copy
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import yaml

from pipeline import publish, store

REPO = Path(__file__).resolve().parent.parent
WEBTEXT = REPO / "tests" / "fixtures" / "webtext"
CORE_MINI = REPO / "tests" / "fixtures" / "core_bundle_mini"


class ShardServer:
    """Serves files of a folder on 127.0.0.1, honouring Range; `faults[name]` is a list of behaviours
    used one per request ("500", "cut", "garbage", "stall", "404"), after which requests succeed.
    `pace=(chunk bytes, pause s)` sends every body in chunks with pauses, so that a download lasts long
    enough to be killed halfway through a body.
    As HuggingFace does, `/resolve/<ref>/<file>` answers with the commit it serves: `revisions[ref] =
    (commit, folder)` serves `folder/<file>` with an `X-Repo-Commit: commit` header (404 for a ref not
    there); with `redirect`, the header rides on a 302 to `/cdn/<commit>/<file>`, which sends the bytes
    without it. Other paths are served from `root`, without the header."""

    def __init__(self, root, pace=None):
        self.root = Path(root)
        self.pace = pace
        self.faults = {}
        self.requests = []  # (file name, Range header or None)
        self.revisions = {}
        self.redirect = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                pending = server.faults.get(name) or []
                fault = pending.pop(0) if pending else None
                root, commit = server.root, None
                parts = [urllib.parse.unquote(p) for p in self.path.split("/")]
                if "resolve" in parts:
                    ref = parts[parts.index("resolve") + 1]
                    if ref not in server.revisions:
                        return self.send_error(404, "Revision Not Found")
                    commit, root = server.revisions[ref]
                    if server.redirect:
                        self.send_response(302)
                        self.send_header("X-Repo-Commit", commit)
                        self.send_header("Location", f"/cdn/{commit}/{name}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                elif parts[1:2] == ["cdn"]:
                    root = next(folder for sha, folder in server.revisions.values() if sha == parts[2])
                path = Path(root) / name
                if fault == "404" or not path.is_file():
                    return self.send_error(404)
                if fault == "500":
                    return self.send_error(500, "scripted failure")
                data = path.read_bytes()
                if fault == "garbage":
                    data = b"<html>this is not a parquet file</html>" * 10
                start = 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and fault != "garbage":
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "stall":
                    time.sleep(3)
                if fault == "cut":  # promise the whole body, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                chunk, pause = server.pace or (len(body) or 1, 0)
                try:
                    for i in range(0, len(body), chunk):
                        self.wfile.write(body[i:i + chunk])
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client killed mid-body (what the kill tests do)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def seconds_for(self, nbytes):
        """How long a paced body of `nbytes` takes to send."""
        chunk, pause = self.pace or (1, 0)
        return nbytes / chunk * pause

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_hp(vocab_size, recipe=None, weight_decay=None, steps=4):
    """The optimizer hyperparameters a depth-2 run of `recipe` derives (train.resolve) at the reference
    batch of 2^19 tokens, so learning rates are not scaled down, for tests that build their own small
    model; `weight_decay` replaces Muon's derived one."""
    from pipeline import train
    hp = train.resolve(train.parse_args(["--depth=2", "--max-seq-len=16", "--device-batch-size=32768",
                                         "--total-batch-size=524288", f"--num-iterations={steps}",
                                         *([f"--recipe={recipe}"] if recipe else [])]), vocab_size, 1)
    if weight_decay is not None:
        hp["weight_decay"] = weight_decay
    return hp


def unlocked(cmd):
    """A train or core shell command without its pipeline.keylock wrapper (tested on its own)."""
    return re.sub(r"^(OMP_NUM_THREADS=1 )?python -m pipeline\.keylock --work \S+ --name \S+ --done \S+ -- ", r"\1",
                  cmd)


# ----------------------------------------------------------------------------- Snakemake end to end

# jobs run the `python` on PATH and check that it imports this checkout's pipeline: this test's python,
# activated or not
ENV = {**os.environ, "WANDB_MODE": "disabled",
       "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def snakemake_cmd(workdir, *args, config="config.yaml", cores="2"):
    """Snakemake on this checkout's Snakefile in `workdir`; cores=None leaves --cores to a profile."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(Path(workdir) / config), *(["--cores", cores] if cores else []), *args]


def snakemake(workdir, *args, config="config.yaml"):
    return subprocess.run(snakemake_cmd(workdir, *args, config=config), capture_output=True, text=True, timeout=600,
                          env=ENV)


def write_config(workdir, cfg, name="config.yaml"):
    """Write a copy of `cfg` for a run in `workdir`, and return that copy (the config the run plans from)."""
    # the repo config's local paths are relative to the checkout; these runs happen elsewhere
    cfg = copy.deepcopy(cfg)
    cfg["core_bundles"]["core_mini"]["url"] = str(REPO / "tests" / "fixtures" / "core_bundle_mini")
    (Path(workdir) / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


# ----------------------------------------------------------------------------- published rows, made up

GIT = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": False}


def sealed(store_root, stage, key, files, params=None, inputs=(), resolved=None):
    """A real store directory: `files` written to scratch, then sealed with a manifest."""
    scratch = store_root.parent / "scratch" / stage / key
    scratch.mkdir(parents=True)
    for name, text in files.items():
        (scratch / name).write_text(text)
    spec = {"stage": stage, "key": key, "params": params or {}, "inputs": list(inputs), "source_digest": "0" * 64}
    store.seal(spec, list(files), scratch, store_root / stage / key, resolved=resolved,
               extra={"git": GIT, "finished_at": "2026-12-01T10:00:00+00:00"})
    return store_root / stage / key


def write_row(results, name, *, core_metric, partial, time_s, depth, gpus=8, device="NVIDIA H100 80GB HBM3",
              seeds=None, recipe=None, val_bpb=0.7483, flops=None, spread=(0.004, 60.0, 0.0)):
    """results/<name>/ as `snakemake results/<name>/core.json` leaves it, through the real publish code.
    Seeds spread around the given CORE, time and val_bpb by `spread` per seed; FLOPs default to d24's
    4.33e19 scaled by depth."""
    store_root = results / "store"
    trains, cores = [], []
    for i, seed in enumerate(seeds or [None]):
        offset = i - (len(seeds or [0]) - 1) / 2  # seeds spread around the mean
        metric = core_metric + spread[0] * offset
        tag = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
        tasks = {"arc_easy": {"centered": 0.45 + i / 100, "accuracy": 0.59, "items": 2376, "correct": 1400,
                              "type": "mc", "num_fewshot": 10, "random_baseline": 25.0},
                 "piqa": {"centered": 0.42, "accuracy": 0.71, "items": 1838, "correct": 1300, "type": "mc",
                          "num_fewshot": 10, "random_baseline": 50.0}}
        core = {"core_metric": metric, "partial": partial, "tasks_evaluated": 2 if partial else 22, "tasks": tasks,
                "max_per_task": -1, "comparable_to_gpt2": not partial,
                "beats_gpt2": None if partial else metric > 0.256525}
        summary = {"total_training_time": time_s + spread[1] * i,
                   "total_training_flops": flops or 4.33e19 * depth / 24, "step": 16704, "tokens": 16704 * 524288,
                   "min_val_bpb": val_bpb - 0.0002 + spread[2] * offset, "val_bpb": val_bpb + spread[2] * offset,
                   "world_size": gpus, "device": device,
                   "tok_per_sec": 811000.0 + 1000 * i, "mfu": 48.5 + i, "compiled": True, "window_attention": "flash",
                   "fp8_layers": {"converted": ["transformer.h.0.attn.c_q (1536->1536)", "lm_head (1536->32768)"],
                                  "skipped": []}}
        steps = (1, 8000, 16704)
        metrics = [{"step": s, "loss": 3.0 - s / 10000, "total_training_time": time_s * s / 16704} for s in steps]
        metrics += [{"step": s, "val_bpb": 0.9 - s / 100000} for s in (0, 8000, 16704)]
        train = sealed(store_root, "train", tag[:16],
                       {"train_summary.json": store.json_text(summary),
                        "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics)},
                       params={"depth": depth, **({"seed": seed} if seed is not None else {}),
                               **({"recipe": recipe} if recipe else {})},
                       resolved={"flops_per_token": 4.9451e9 * depth / 24, "total_batch_size": 524288,
                                 "param_counts": {"total": 1_384_124_976 * depth // 24,
                                                  "scaling": 729_813_504 * depth // 24}})
        trains.append(train)
        cores.append(sealed(store_root, "core", tag[16:32], {"core.json": store.json_text(core)},
                            inputs=[f"train/{train.name}"]))
    d = results / name
    publish.train_summary(trains, d / "train_summary.json", d / "metrics.jsonl")
    stage_dirs = {"train": trains, "core": cores}
    publish.publish_seeded("core.json", trains, cores, d / "core.json")
    store.write_json(d / "manifest.json", publish.row_manifest(
        name, stage_dirs, f"snakemake --cores all results/{name}/core.json"))
    return d
