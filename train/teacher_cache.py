"""`python -m train.teacher_cache`: run a teacher once over many prompts and keep what a student
learns from (the offline cache of S2DiT-KD and the ODE pairs of the few-step initialisation).

Per sample it stores the starting noise, the latent state x_t at each kept solver step (with the
noise level sigma and the t the model was called with), the final clean latents x0, the text
context (the text encoder's output, trimmed to its length), the global sample index and the
seed. A streaming teacher generates chunk by chunk, so its context for chunk c is its own
earlier x0 chunks (the causal trajectories an autoregressive student needs).

    CACHE/meta.json                 teacher hash, step grid, kept steps, guidance, shapes, version
    CACHE/part-00000.safetensors    samples [0, N), stacked, written atomically
    CACHE/part-00001.safetensors    samples [N, 2N) ...
    CACHE/shard-0-of-1.done         a shard's completion marker

Part k belongs to shard k mod n (`--shard i/n`), and sample j's noise is keyed by (seed, j), so
the parts of several shards (machines) together are byte-identical to one run, and a killed run
resumes to the same bytes (finished parts are kept, the rest are made again). A cache whose
meta.json does not match the run is refused.

    python -m train.teacher_cache --teacher models/teacher --prompts shapes:512 --out cache/t
    python -m train.teacher_cache --teacher models/wan-1.3b --prompts prompts.txt \\
        --out cache/wan --steps 48 --shift 5 --guidance 5 --keep every:12 --shard 0/4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from s2dit_mlx import generation
from s2dit_mlx.cli_args import Parser
from s2dit_mlx.errors import S2DiTError, run_cli

FORMAT = "s2dit-teacher-cache"
FORMAT_VERSION = 1
META = "meta.json"
KEYS = ("noise", "states", "x0", "context", "context_lengths", "index", "seed")


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds; equal specs make equal bytes (meta.json is its JSON)."""

    teacher: str
    teacher_sha256: str
    mode: str  # "streaming" (causal teacher) or "bidirectional"
    solver: str
    steps: int
    shift: float
    guidance: float
    negative_prompt: str
    timesteps: tuple[float, ...]  # t the model is called with, every step
    sigmas: tuple[float, ...]  # noise level entering every step
    keep: tuple[int, ...]  # indices of the kept steps
    frames: int  # latent frames
    latent_height: int
    latent_width: int
    channels: int
    frames_per_chunk: int
    prompts_sha256: str
    num_samples: int
    samples_per_part: int
    seed: int

    @property
    def num_parts(self) -> int:
        """Parts of `samples_per_part` samples (the last may hold fewer)."""
        return math.ceil(self.num_samples / self.samples_per_part)

    def to_json(self) -> dict:
        """meta.json's contents."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data.update(timesteps=list(self.timesteps), sigmas=list(self.sigmas), keep=list(self.keep))
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict) -> CacheSpec:
        """Read meta.json's contents."""
        if data.get("format") != FORMAT:
            raise S2DiTError(f"not a teacher cache (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise S2DiTError(
                f"teacher cache format version {data.get('format_version')} is not {FORMAT_VERSION}"
            )
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        for k in ("timesteps", "sigmas", "keep"):
            fields[k] = tuple(fields[k])
        return cls(**fields)

    def kept_timesteps(self) -> list[float]:
        """The model t of every kept step."""
        return [self.timesteps[i] for i in self.keep]


def parse_keep(text: str, steps: int) -> tuple[int, ...]:
    """'all', 'every:K' (0, K, 2K, ...) or '0,4,8' -> sorted step indices."""
    if text == "all":
        return tuple(range(steps))
    if text.startswith("every:"):
        k = int(text[len("every:") :])
        if k < 1:
            raise S2DiTError(f"--keep every:K needs K >= 1, got {k}")
        return tuple(range(0, steps, k))
    try:
        idx = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise S2DiTError(
            f"--keep takes all, every:K or step indices like 0,4,8; got {text!r}"
        ) from None
    if not idx or idx[0] < 0 or idx[-1] >= steps:
        raise S2DiTError(f"--keep step indices must lie in 0..{steps - 1}, got {text!r}")
    return tuple(idx)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise S2DiTError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise S2DiTError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def read_prompts(source: str, seed: int) -> list[str]:
    """Prompts from a UTF-8 text file (one per line) or `shapes:N` (the procedural world)."""
    if source.startswith("shapes:"):
        from s2dit_mlx.world.shapes import random_prompt

        try:
            n = int(source[len("shapes:") :])
        except ValueError:
            raise S2DiTError(f"--prompts shapes:N needs a count, got {source!r}") from None
        if n < 1:
            raise S2DiTError(f"--prompts shapes:N needs N >= 1, got {n}")
        rng = np.random.default_rng(seed)
        return [random_prompt(rng) for _ in range(n)]
    path = Path(source)
    if not path.is_file():
        raise S2DiTError(f"prompt file {source} does not exist (or give shapes:N)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise S2DiTError(f"prompt file {source} is not UTF-8 text ({err.reason})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise S2DiTError(f"prompt file {source} holds no prompt")
    return prompts


def weights_sha256(folder: Path) -> str:
    """sha256 over the DiT weight files of a model folder (the teacher's identity)."""
    files = sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("*/model*.safetensors"))
    files = [f for f in files if f.parent.name not in ("vae", "text_encoder")]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Generating


def part_path(out: Path, k: int) -> Path:
    """Where part k lives."""
    return out / f"part-{k:05d}.safetensors"


class _Recorder(generation.NoiseSource):
    """A sample's noise source that keeps every starting draw, and the step hook that keeps the
    states of the kept steps (chunk by chunk for a streaming teacher)."""

    def __init__(self, noise: generation.NoiseSource, keep: tuple[int, ...]):
        self.noise = noise
        self.draws: list[mx.array] = []
        self.states: dict[int, list[mx.array]] = {i: [] for i in keep}

    def draw(self, shape):
        x = self.noise.draw(shape)
        self.draws.append(x)
        return x

    def on_step(self, info: generation.StepInfo) -> None:
        if info.step in self.states:
            self.states[info.step].append(info.x_t)


def generate_samples(bundle, spec: CacheSpec, prompts: list[str], indices: list[int]) -> dict:
    """Teacher trajectories of the given global sample indices, as stacked numpy arrays."""
    dit, text_encoder = bundle.dit, bundle.text_encoder
    sampler = generation.Sampler(spec.solver, spec.steps, spec.shift, spec.guidance)
    out = {k: [] for k in KEYS}
    for j in indices:
        context = text_encoder.encode([prompts[j]]).astype(mx.float32)
        neg = (
            text_encoder.encode([spec.negative_prompt]).astype(mx.float32)
            if sampler.guided
            else None
        )
        recorder = _Recorder(generation.SeededNoise.for_samples(spec.seed, [j]), spec.keep)
        shape = (1, spec.frames, spec.latent_height, spec.latent_width, spec.channels)
        if spec.mode == "streaming":
            chunks = generation.stream(
                dit, context, spec.frames, shape[2:4], sampler,
                noise=recorder, neg_context=neg, on_step=recorder.on_step,
            )  # fmt: skip
            x0 = mx.concatenate([c.latents for c in chunks], axis=1)
        else:
            x0 = generation.denoise(
                dit, context, shape, sampler, noise=recorder, neg_context=neg,
                on_step=recorder.on_step,
            )  # fmt: skip
        mx.eval(x0)
        out["noise"].append(np.array(mx.concatenate(recorder.draws, axis=1)[0]))
        out["states"].append(
            np.stack([np.array(mx.concatenate(recorder.states[i], axis=1)[0]) for i in spec.keep])
        )
        out["x0"].append(np.array(x0[0]))
        out["context"].append(np.array(context[0]))
        out["index"].append(j)
        out["seed"].append(spec.seed)
    longest = max(c.shape[0] for c in out["context"])
    padded = [np.pad(c, [(0, longest - c.shape[0]), (0, 0)]) for c in out["context"]]
    return {
        "noise": np.stack(out["noise"]).astype(np.float32),
        "states": np.stack(out["states"]).astype(np.float32),
        "x0": np.stack(out["x0"]).astype(np.float32),
        "context": np.stack(padded).astype(np.float32),
        "context_lengths": np.array([c.shape[0] for c in out["context"]], np.int32),
        "index": np.array(out["index"], np.int64),
        "seed": np.array(out["seed"], np.int64),
        "sigmas": np.array([spec.sigmas[i] for i in spec.keep], np.float32),
        "timesteps": np.array([spec.timesteps[i] for i in spec.keep], np.float32),
    }


def write_part(path: Path, arrays: dict) -> None:
    """One part as safetensors, written beside the target and renamed into place."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(
            str(tmp), {k: mx.array(v) for k, v in arrays.items()}, metadata={"format": FORMAT}
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_spec(
    args: argparse.Namespace, bundle, teacher_path: Path, prompts: list[str]
) -> CacheSpec:
    """The run's CacheSpec from its arguments and the teacher's defaults, every setting checked."""
    d = bundle.defaults
    dit, vae = bundle.dit, bundle.vae
    mode = args.mode or d["mode"]
    solver = args.solver or (d["solver"] if d["solver"] != generation.FEW_STEP else "euler")
    steps = args.steps or d["steps"]
    shift = args.shift if args.shift is not None else d["shift"]
    guidance = args.guidance if args.guidance is not None else d["guidance"]
    sampler = generation.Sampler(solver, steps, shift, guidance)
    if solver == generation.FEW_STEP:
        raise S2DiTError(
            "a teacher cache records an ODE solver's trajectory: --solver euler or unipc"
        )
    sampler.validate(streaming=mode == "streaming")
    ode = sampler.solver()
    frames = args.frames or d["frames"]
    height, width = args.height or d["height"], args.width or d["width"]
    tf, multiple = vae.temporal_factor, vae.spatial_factor * dit.args.spatial_multiple()
    if (frames - 1) % tf or frames < 1:
        raise S2DiTError(f"--frames must be {tf}k + 1, got {frames}")
    for name, value in (("height", height), ("width", width)):
        if value < 1 or value % multiple:
            raise S2DiTError(f"--{name} {value} is not a positive multiple of {multiple}")
    if args.samples_per_part < 1:
        raise S2DiTError(f"--samples-per-part must be >= 1, got {args.samples_per_part}")
    return CacheSpec(
        teacher=str(args.teacher),
        teacher_sha256=weights_sha256(teacher_path),
        mode=mode,
        solver=solver,
        steps=steps,
        shift=float(shift),
        guidance=float(guidance),
        negative_prompt=d["negative_prompt"],
        timesteps=tuple(float(t) for t in ode.timesteps),
        sigmas=tuple(float(s) for s in ode.sigmas[:-1]),
        keep=parse_keep(args.keep, steps),
        frames=1 + (frames - 1) // tf,
        latent_height=height // vae.spatial_factor,
        latent_width=width // vae.spatial_factor,
        channels=dit.args.in_dim,
        frames_per_chunk=dit.args.frames_per_chunk,
        prompts_sha256=_prompts_sha256(prompts),
        num_samples=len(prompts),
        samples_per_part=args.samples_per_part,
        seed=args.seed,
    )


def check_meta(out: Path, spec: CacheSpec) -> bool:
    """True when out/meta.json exists and matches; S2DiTError naming the first difference."""
    meta = out / META
    if not meta.is_file():
        return False
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise S2DiTError(f"{meta} is not readable JSON ({err})") from None
    want = spec.to_json()
    for key, value in want.items():
        if key == "teacher":  # the same weights under another path are the same teacher
            continue
        if saved.get(key) != value:
            raise S2DiTError(
                f"{out} was made by another run ({key}: {saved.get(key)!r} there, {value!r} now); "
                "use another --out"
            )
    return True


def run(args: argparse.Namespace) -> Path:
    """Make (or resume) this shard of the cache; returns the cache folder."""
    from s2dit_mlx.loading import load_model, resolve_model_path

    shard, shards = parse_shard(args.shard)
    prompts = read_prompts(args.prompts, args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise S2DiTError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise S2DiTError(f"--out {out} holds other files and no teacher cache; choose a new folder")
    teacher_path = resolve_model_path(args.teacher)
    bundle = load_model(teacher_path)
    spec = build_spec(args, bundle, teacher_path, prompts)
    resumed = check_meta(out, spec)
    out.mkdir(parents=True, exist_ok=True)
    if not resumed:
        tmp = out / f".{META}.tmp"
        tmp.write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / META)
    mine = [k for k in range(spec.num_parts) if k % shards == shard]
    todo = [k for k in mine if not part_path(out, k).is_file()]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(mine), initial=len(mine) - len(todo), unit="part", desc="teacher cache"
        )
    try:
        for k in todo:
            start = k * spec.samples_per_part
            indices = list(range(start, min(start + spec.samples_per_part, spec.num_samples)))
            write_part(part_path(out, k), generate_samples(bundle, spec, prompts, indices))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    (out / f"shard-{shard}-of-{shards}.done").write_text(f"{len(mine)} parts\n", encoding="utf-8")
    print(
        f"wrote {out}: {len(mine)} parts of shard {shard}/{shards} ({len(todo)} new)",
        file=sys.stderr,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """A finished teacher cache: its spec and its samples (by global index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = self.path / META
        if not meta.is_file():
            raise S2DiTError(f"{self.path} is not a teacher cache (no {META})")
        try:
            self.spec = CacheSpec.from_json(json.loads(meta.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise S2DiTError(f"{meta} is not a valid teacher cache meta ({err})") from None
        missing = [k for k in range(self.spec.num_parts) if not part_path(self.path, k).is_file()]
        if missing:
            raise S2DiTError(
                f"teacher cache {self.path} is incomplete: part {missing[0]} of {self.spec.num_parts} "
                "is missing (finish every shard first)"
            )
        self._parts: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.spec.num_samples

    def part(self, k: int) -> dict[str, mx.array]:
        """The arrays of part k (loaded once)."""
        if k not in self._parts:
            try:
                arrays = mx.load(str(part_path(self.path, k)))
            except Exception as err:  # mlx raises RuntimeError/ValueError on corrupt files
                raise S2DiTError(f"teacher cache part {k} is not readable ({err})") from None
            n = min(
                self.spec.samples_per_part, self.spec.num_samples - k * self.spec.samples_per_part
            )
            want = (
                n,
                self.spec.frames,
                self.spec.latent_height,
                self.spec.latent_width,
                self.spec.channels,
            )
            if tuple(arrays.get("x0", mx.zeros((0,))).shape) != want:
                raise S2DiTError(
                    f"teacher cache part {k} does not hold what meta.json says (x0 {want})"
                )
            self._parts[k] = arrays
        return self._parts[k]

    def samples(self, indices: list[int]) -> dict[str, mx.array]:
        """noise, states [B, K, ...], x0, context (padded to the longest) of global indices."""
        per = self.spec.samples_per_part
        rows = [self.part(j // per) for j in indices]
        pick = {
            k: [r[k][j % per] for r, j in zip(rows, indices, strict=True)]
            for k in ("noise", "states", "x0")
        }
        lengths = [int(r["context_lengths"][j % per]) for r, j in zip(rows, indices, strict=True)]
        longest = max(lengths)
        contexts = [
            r["context"][j % per][:n] for r, j, n in zip(rows, indices, lengths, strict=True)
        ]
        contexts = [mx.pad(c, [(0, longest - c.shape[0]), (0, 0)]) for c in contexts]
        return {
            **{k: mx.stack(v) for k, v in pick.items()},
            "context": mx.stack(contexts),
            "context_lengths": mx.array(lengths),
        }

    def check_points(self, points: list[float], tolerance: float = 1e-3) -> list[int]:
        """Kept-step positions of a student's few-step points; S2DiTError if one is off the grid.

        Points are model timesteps; they are matched by noise level (t / 1000 against the kept
        steps' sigmas, within `tolerance`): Wan-style solvers call the model with int-truncated
        timesteps, and Wan's UniPC grid starts at shift(1 - 1/1000), not at 1 (0.2 in t).
        """
        kept = [self.spec.sigmas[i] for i in self.spec.keep]
        positions = []
        for t in points:
            hits = [i for i, s in enumerate(kept) if abs(1000.0 * s - t) <= 1000.0 * tolerance]
            if not hits:
                raise S2DiTError(
                    f"student timestep {t:g} is not on the teacher cache's kept steps "
                    f"({', '.join(f'{1000.0 * s:g}' for s in kept)}): make the teacher's steps a "
                    "multiple of the student's at the same shift, and keep those steps"
                )
            positions.append(hits[0])
        return positions


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.teacher_cache`."""
    p = Parser(
        prog="python -m train.teacher_cache",
        description="Run a teacher model over prompts once and cache its trajectories for "
        "distillation (S2DiT-KD and ODE regression).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher", required=True, metavar="MODEL", help="teacher model folder or hub id"
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE|shapes:N",
        help="prompt file (one per line) or shapes:N",
    )
    p.add_argument(
        "--out", required=True, metavar="CACHE", help="cache folder (created, or resumed)"
    )
    p.add_argument("--mode", choices=("streaming", "bidirectional"), help="default: the teacher's")
    p.add_argument(
        "--solver",
        choices=("euler", "unipc"),
        help="default: the teacher's (euler for few-step teachers)",
    )
    p.add_argument("--steps", type=int, metavar="N", help="solver steps (default: the teacher's)")
    p.add_argument(
        "--shift", type=float, metavar="S", help="timestep shift (default: the teacher's)"
    )
    p.add_argument("--guidance", type=float, metavar="G", help="CFG scale (default: the teacher's)")
    p.add_argument(
        "--keep",
        default="all",
        metavar="STEPS",
        help="steps whose states are kept: all, every:K or 0,4,8 (default all)",
    )
    p.add_argument("--frames", type=int, metavar="N", help="pixel frames (default: the teacher's)")
    p.add_argument("--height", type=int, metavar="PX", help="default: the teacher's")
    p.add_argument("--width", type=int, metavar="PX", help="default: the teacher's")
    p.add_argument(
        "--samples-per-part",
        type=int,
        default=16,
        metavar="N",
        help="samples per part file (default 16)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="noise seed; sample j uses (seed, j) (default 0)",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="make the parts k with k mod N == I (default 0/1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""

    def body() -> int:
        run(build_parser().parse_args(argv))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
