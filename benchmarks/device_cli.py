"""How fast the device's read-only commands answer: cold processes, median of 5.

``fedpersona device status | budget | profile | token | export`` and ``forget`` read (or erase)
the encrypted store and never load torch or a model. This builds one device store as a user's
would look after three federated rounds and some use (SmolLM2 settings, personal and global
tensors of the SmolLM2 LoRA shape, a charged ledger, 100 interactions, feedback, a learned
profile; unlocked with a passphrase, i.e. scrypt), then runs each command as a new process,
the way a user types it, five times, and prints the median wall time beside the 1.5 s target.

    python -m benchmarks.device_cli --out bench-cli
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5
PASSPHRASE = "a long passphrase for the benchmark"
COMMANDS = ("status", "budget", "profile", "token", "export", "forget")


def build_store(data_dir: Path) -> None:
    """A device store as a user's looks after three federated rounds and some use."""
    import numpy as np
    import torch

    from client.assistant.evidence import Gate
    from client.assistant.profile import Profile
    from client.federation.ledger import PrivacyLedger
    from client.store import LocalStore
    from client.store.state import (
        GATE_BLOB,
        GLOBAL_BLOB,
        PERSONAL_BLOB,
        init_device,
        tensors_to_bytes,
    )
    from client.store.status import load_settings, open_state
    from common.crypto import Secret

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    with LocalStore.create(data_dir, Secret(passphrase=PASSPHRASE)) as store:
        init_device(store, model="smollm2", strategy="fedsa")
        cfg = load_settings(store)
        # SmolLM2's LoRA on q_proj/v_proj, r = 4: B is 576×4 (q) and 192×4 (v) per layer.
        shapes = {"q_proj": (576, 4), "v_proj": (192, 4)}
        personal = {
            f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.default.weight": torch.randn(
                *shape, generator=gen
            )
            * 0.01
            for i in range(30)
            for m, shape in shapes.items()
        }
        shared = {n.replace("lora_B", "lora_A"): t.T.contiguous() for n, t in personal.items()}
        store.put_blob(PERSONAL_BLOB, tensors_to_bytes(personal, {}))
        store.put_blob(GLOBAL_BLOB, tensors_to_bytes(shared, {}))
        state = open_state(store, cfg)
        state.meta.rounds_trained, state.meta.last_round = 3, 3
        state.meta.personal_loss, state.meta.global_loss = 4.29, 4.66
        state.save_meta()
        ledger = PrivacyLedger(cfg.privacy.caps)
        for r in range(1, 4):
            ledger.charge(server_round=r, record=None, user=(7.1, 1.0, 1))
        ledger.save(store)
        gate = Gate()
        for _ in range(5):
            gate.record(personal_loss=3.9, global_loss=4.4)
        store.put_json(GATE_BLOB, gate.state_dict())
        profile = Profile(domains=["sailing", "history"])
        for i in range(100):
            vec = rng.normal(size=384).astype(np.float32)
            vec /= np.linalg.norm(vec)
            iid = store.add_interaction(
                f"question {i}: " + "how would you describe the sea at night? " * 2,
                "answer: " + "the waves whisper under a silver moon. " * 6,
                context={"time_of_day": "evening", "weekday": "Monday", "device": "laptop"},
                embedding=vec,
            )
            if i % 3 == 0:
                store.add_feedback(iid, "rating", value=5.0)
                profile.observe(response="a kept answer " * 10, embedding=vec, rating=5)
        store.put_profile(profile.to_dict())


def _command(name: str, data_dir: Path, out: Path) -> list[str]:
    exe = str(Path(sys.executable).parent / "fedpersona")
    if name == "forget":
        return [exe, "device", "forget", "--yes", "--data-dir", str(data_dir)]
    args = [exe, "device", name, "--data-dir", str(data_dir)]
    if name == "export":
        args += ["--out", str(out / "export.json"), "--force"]
    return args


def bench(repeats: int = 5) -> dict:
    """Median cold-process wall time per command (seconds), with the store they ran on."""
    env = {**os.environ, "FEDPERSONA_PASSPHRASE": PASSPHRASE}
    times: dict[str, list[float]] = {name: [] for name in ("python -c pass", *COMMANDS)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = root / "template"
        build_store(template)
        store_bytes = sum(p.stat().st_size for p in template.iterdir())
        for _ in range(repeats):
            for name in times:
                data_dir = root / "dev"
                shutil.rmtree(data_dir, ignore_errors=True)
                shutil.copytree(template, data_dir)
                cmd = (
                    [sys.executable, "-c", "pass"]
                    if name == "python -c pass"
                    else _command(name, data_dir, root)
                )
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                times[name].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return {
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "store_bytes": store_bytes,
        "unlock": "passphrase (scrypt)",
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "all_s": times,
        "target_s": TARGET_S,
        "all_under_target": all(statistics.median(times[c]) < TARGET_S for c in COMMANDS),
    }


def markdown(r: dict) -> str:
    """The results as a Markdown table."""
    lines = [
        f"| command (cold process, median of {r['repeats']}) | seconds | < {r['target_s']} s |",
        "|---|---|---|",
    ]
    for name, sec in r["median_s"].items():
        label = name if name.startswith("python") else f"`fedpersona device {name}`"
        mark = "" if name.startswith("python") else ("yes" if sec < r["target_s"] else "no")
        lines.append(f"| {label} | {sec:.2f} | {mark} |")
    return "\n".join(lines)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-cli"))
    args = parser.parse_args()
    result = bench(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cli.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "bench_cli.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
