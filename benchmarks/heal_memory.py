"""Healing memory and speed: peak memory and training tokens/s of `mha2mla heal`, one configuration per process.

    mha2mla convert SmolLM2-135M-DIR --output /tmp/heal-mla --rank 96 --rope-dim 32
    python benchmarks/heal_memory.py --model /tmp/heal-mla --teacher SmolLM2-135M-DIR \
        --config before:code=/tmp/heal-before --config after --steps 3 --out benchmarks/results/heal_memory.json

Each configuration runs ``mha2mla.heal.loop.heal`` for ``--steps`` optimizer steps (defaults: 4 × 1024 tokens per step,
distillation when ``--teacher`` is given) in a fresh Python process, so each peak is its own:

* CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), i.e. everything the run held at once,
  including the loaded weights, the step-0 reference pass and the data.
* GPU: ``torch.cuda.max_memory_allocated`` (the heal record's ``peak_device_memory_bytes``), plus the host peak.

A configuration is ``NAME[:KEY=VALUE,...]``: recipe keys (``gradient_checkpointing=false``, ``loss_chunk_tokens=0``,
``attn_implementation=eager``, ...), ``recipe=PATH`` for a recipe file, ``teacher=DIR`` (``teacher=`` for none;
default ``--teacher``), ``NAME=VALUE`` in capitals for an environment variable of the run (e.g. glibc's
``MALLOC_MMAP_THRESHOLD_``), and ``code=DIR``, a directory whose
``mha2mla`` package is imported instead of this checkout's (e.g. ``git archive HEAD mha2mla | tar -x -C DIR``: the
code before a change, measured by the same script under the same conditions). Tokens/s is the heal record's: the
training tokens of all the run's steps over the loop's wall time (the first step included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("MHA2MLA_ASSETS", "/work/assets"))


def _parse_config(spec: str) -> dict:
    name, _, rest = spec.partition(":")
    cfg = {"name": name, "code": None, "recipe": None, "teacher": None, "env": {}, "keys": {}}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --config {spec!r}: {item!r} is not KEY=VALUE")
        if key in ("code", "recipe", "teacher"):
            cfg[key] = value
            continue
        if key.isupper():  # an environment variable of the run, e.g. MALLOC_MMAP_THRESHOLD_=4194304
            cfg["env"][key] = value
            continue
        import yaml

        cfg["keys"][key] = yaml.safe_load(value)
    return cfg


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/heal-mla", help="a converted checkpoint (mha2mla convert ... 96+32)")
    p.add_argument("--teacher", default=str(ASSETS / "models" / "smollm2-135m"), help="'' for cross-entropy only")
    p.add_argument("--data", default=str(ASSETS / "text" / "enwiki.train.txt"))
    p.add_argument("--config", action="append", default=[], help="NAME[:KEY=VALUE,...]; repeatable (default: 'after')")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's (1024)")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's (4)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: what accelerate picks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heal_memory.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_bytes(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _hwm_bytes() -> int | None:
    hwm = _status_bytes("self", "VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child(spec: str) -> None:
    job = json.loads(spec)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import resource

    import torch

    import mha2mla
    from mha2mla.heal.loop import heal

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job["device"] == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    keys = dict(job["keys"])
    with tempfile.TemporaryDirectory(prefix="heal-mem-") as work:
        t = time.time()
        rec = heal(model=job["model"], output=os.path.join(work, "out"), data=job["data"], recipe=job["recipe"],
                   teacher=job["teacher"] or None, max_steps=job["steps"], force=True, save_every=0, **keys)
        seconds = time.time() - t
    out = {
        "code": os.path.dirname(os.path.dirname(os.path.abspath(mha2mla.__file__))),
        "peak_rss_bytes": _hwm_bytes(),
        "peak_device_memory_bytes": rec.get("peak_device_memory_bytes"),
        "tokens_per_second": rec.get("tokens_per_second"),
        "tokens": rec["tokens"], "steps": rec["steps"], "seconds": round(seconds, 1),
        "losses": rec["losses"], "ce": rec["ce"], "kd": rec["kd"],
        "step0_converted_loss": rec["step0"]["converted_loss"],
        "recipe": rec["recipe"], "memory": rec.get("memory"), "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() and job["device"] != "cpu" else "cpu",
        # the whole process's CPU time (loading and the step-0 pass included) and the machine's load at the end:
        # on a shared machine, wall-clock tokens/s depends on what else runs
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print("HEAL_MEMORY_RESULT " + json.dumps(out), flush=True)


def _run_config(cfg: dict, args) -> dict:
    keys = dict(cfg["keys"])
    if args.seq_len is not None:
        keys.setdefault("seq_len", args.seq_len)
    if args.micro_batch is not None:
        keys.setdefault("micro_batch_size", args.micro_batch)
    seq, mbs = keys.get("seq_len", 1024), keys.get("micro_batch_size", 4)
    keys.setdefault("max_data_tokens", max(4 * args.steps * seq * mbs, 65536))
    keys.setdefault("log_every", 1)
    teacher = args.teacher if cfg["teacher"] is None else cfg["teacher"]
    job = {"model": args.model, "teacher": teacher, "data": args.data, "recipe": cfg["recipe"], "keys": keys,
           "steps": args.steps, "threads": args.threads, "device": args.device}
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **cfg["env"])
    code = str(Path(cfg["code"]).resolve()) if cfg["code"] else str(ROOT)
    env["PYTHONPATH"] = code + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"== {cfg['name']}: code {code}, keys {keys}", flush=True)
    t = time.time()
    # The child's log goes to our stderr as it runs; its peak RSS is also sampled from here, so that a run killed
    # for memory still reports how far it got.
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)], env=env,
                         stdout=subprocess.PIPE, text=True)
    observed = 0
    out_lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        while p.poll() is None:
            observed = max(observed, _status_bytes(p.pid, "VmHWM") or 0)
            if time.time() - t > args.timeout:
                return {"name": cfg["name"], "error": f"timed out after {args.timeout} s",
                        "peak_rss_bytes_observed": observed or None}
            time.sleep(0.5)
    finally:  # never leave the child running (timeout, Ctrl-C, SIGTERM)
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(timeout=10)
    line = [ln.strip() for ln in out_lines if ln.startswith("HEAL_MEMORY_RESULT ")]
    if p.returncode != 0 or not line:
        return {"name": cfg["name"], "error": f"exit {p.returncode}", "peak_rss_bytes_observed": observed or None,
                "wall_seconds": round(time.time() - t, 1)}
    res = json.loads(line[-1].split(" ", 1)[1])
    commit = None
    if cfg["code"] and (Path(cfg["code"]) / "COMMIT").is_file():
        commit = (Path(cfg["code"]) / "COMMIT").read_text().strip()
    return {"name": cfg["name"], "keys": cfg["keys"], "env": cfg["env"], "recipe_file": cfg["recipe"], "teacher": teacher or None,
            "commit": commit, **res,
            "wall_seconds": round(time.time() - t, 1)}


def main(argv=None) -> dict:
    args = _args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that stop the child
    if args.child:
        _child(args.child)
        return {}
    configs = [_parse_config(c) for c in (args.config or ["after"])]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    runs = []
    for cfg in configs:
        r = _run_config(cfg, args)
        runs.append(r)
        _print_row(r)
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "commit": commit, "runs": runs,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("\n| configuration | peak host RSS GiB | peak GPU GiB | tokens/s | process CPU s | step-1 loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        _print_row(r, table=True)
    print(f"\nwrote {out}")
    return result


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _print_row(r: dict, table: bool = False) -> None:
    if "error" in r:
        seen = f"{r['error']}; ≥ {_gib(r.get('peak_rss_bytes_observed'))} seen"
        print(f"| {r['name']} | {seen} | | | | |" if table else f"{r['name']}: {seen}")
        return
    row = (f"| {r['name']} | {_gib(r['peak_rss_bytes'])} | {_gib(r['peak_device_memory_bytes'])} | "
           f"{r['tokens_per_second']} | {r.get('cpu_seconds', '-')} | {r['losses'][0]:.6f} |")
    print(row, flush=True)


if __name__ == "__main__":
    main()
