"""The trained aLoRA judges of the default model (SmolLM2-135M-Instruct): their data, and `jalora train`.

    python -m checkpoints.train_judges                 # data + both judges into checkpoints/smollm2_judges
    python -m checkpoints.train_judges --data-only DIR # only the JSON-lines data

Nothing is downloaded but the default model itself: every example is generated here from a seed, and
the script knows each one's truth.

- `correctness`: a user asks a country's capital, language or continent; the assistant's answer is
  right or wrong (another country's value), in several phrasings. The judge answers Y (right) or N.
  Only facts the base model itself answers right are asked (`UNKNOWN`, checked by `--check-facts`).
- `format`: a user asks for an answer in a given form (a single number, one word, one sentence, yes or
  no, capital letters); the assistant's answer keeps to it or not, whatever its content. Y or N.

Each judge reads the conversation with the base model's KV and answers in a turn of its own, opened by
its invocation `<|im_start|>{name}\\n` (the chat template's opening of a turn), as `jalora demo` asks
it. Held-out facts (countries, sums) never occur in training, so the held-out accuracy that
`python -m bench.judge_accuracy` measures is about questions a judge has not seen.

Training runs `jalora train` (a subprocess per judge) on whatever device JAX finds; on a CPU it takes
a while (the command and the wall time of the committed run are in smollm2_judges/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "smollm2_judges"
SEED = 20261203
HELD_OUT = 0.2  # share of each relation's subjects (and of the format judge's facts) kept out of training

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow",
    "Egypt": "Cairo", "Greece": "Athens", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi", "Thailand": "Bangkok",
    "South Korea": "Seoul", "India": "New Delhi", "Turkey": "Ankara", "Australia": "Canberra",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Ukraine": "Kyiv", "Switzerland": "Bern",
    "the Czech Republic": "Prague", "Vietnam": "Hanoi", "Colombia": "Bogota",
}  # fmt: skip

LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Portugal": "Portuguese",
    "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Greece": "Greek", "Poland": "Polish",
    "Mexico": "Spanish", "Argentina": "Spanish", "Egypt": "Arabic", "Turkey": "Turkish", "Sweden": "Swedish",
    "Norway": "Norwegian", "Finland": "Finnish", "Denmark": "Danish", "the Netherlands": "Dutch",
    "Hungary": "Hungarian", "South Korea": "Korean", "Thailand": "Thai", "Vietnam": "Vietnamese",
    "Iran": "Persian", "Ukraine": "Ukrainian", "the Czech Republic": "Czech", "Austria": "German",
    "the United Kingdom": "English", "Australia": "English", "Peru": "Spanish", "Colombia": "Spanish",
    "Cuba": "Spanish", "Ireland": "English", "Iraq": "Arabic",
}  # fmt: skip

CONTINENTS = {
    "France": "Europe", "Germany": "Europe", "Italy": "Europe", "Spain": "Europe", "Portugal": "Europe",
    "the United Kingdom": "Europe", "Ireland": "Europe", "Japan": "Asia", "China": "Asia", "Russia": "Europe",
    "Egypt": "Africa", "Greece": "Europe", "Austria": "Europe", "Norway": "Europe", "Sweden": "Europe",
    "Finland": "Europe", "Denmark": "Europe", "Poland": "Europe", "Hungary": "Europe", "the Netherlands": "Europe",
    "Belgium": "Europe", "Canada": "North America", "Mexico": "North America", "Argentina": "South America",
    "Peru": "South America", "Chile": "South America", "Kenya": "Africa", "Thailand": "Asia", "South Korea": "Asia",
    "India": "Asia", "Turkey": "Asia", "Australia": "Oceania", "Cuba": "North America", "Iran": "Asia",
    "Iraq": "Asia", "Ukraine": "Europe", "Switzerland": "Europe", "the Czech Republic": "Europe", "Vietnam": "Asia",
    "Colombia": "South America",
}  # fmt: skip

JUDGES = {  # name -> (what it asks, invocation); the invocation opens a turn of the judge's own
    "correctness": ("Is the assistant's answer correct?", "<|im_start|>correctness\n"),
    "format": ("Does the assistant's answer keep to the form the question asks for?", "<|im_start|>format\n"),
}


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _held_out(keys: list, rng: np.random.Generator) -> set:
    order = rng.permutation(len(keys))
    return {keys[i] for i in order[: int(round(len(keys) * HELD_OUT))]}


# Facts SmolLM2-135M-Instruct gets wrong when asked (greedy, first phrasing of `_qa`), as
# `python -m checkpoints.train_judges --check-facts` lists them. A correctness judge reads what the base
# model holds in its KV; where the model does not know the truth, nothing in the conversation tells a judge
# either, so these facts are left out (the model knows 90 of the 114 above; it adds 29 of 81 one-digit sums,
# which is why no sums are asked).
UNKNOWN = {
    "capital": {"Denmark", "India", "Italy", "Portugal", "Spain", "Turkey", "Ukraine", "Vietnam"},
    "language": {"Cuba", "France", "Greece", "Iran", "Ireland", "Poland"},
    "continent": {"Australia", "Cuba", "Greece", "Iran", "Iraq", "Italy", "Norway", "Sweden", "Switzerland", "Turkey"},
}  # fmt: skip


def _facts(known_only: bool = True) -> dict[str, dict[str, str]]:
    """relation -> {subject: the true value}; with `known_only`, only what the base model answers right."""
    tables = {"capital": CAPITALS, "language": LANGUAGES, "continent": {c: CONTINENTS[c] for c in CAPITALS}}
    drop = UNKNOWN if known_only else {}
    return {r: {s: v for s, v in sorted(t.items()) if s not in drop.get(r, ())} for r, t in tables.items()}


def _qa(relation: str, subject: str, value: str, rng: np.random.Generator | None) -> tuple[str, str]:
    """(question, answer stating `value`) in one of a few phrasings (the first of each with no `rng`)."""
    pick = lambda options: options[0 if rng is None else int(rng.integers(len(options)))]  # noqa: E731
    if relation == "capital":
        return (
            pick(
                [
                    f"What is the capital of {subject}?",
                    f"What is the capital of {subject}? Answer in one sentence.",
                    f"Which city is the capital of {subject}?",
                ]
            ),
            pick([f"The capital of {subject} is {value}.", f"{value}.", f"{value} is the capital of {subject}."]),
        )
    if relation == "language":
        return (
            pick([f"What language do people speak in {subject}?", f"What is the main language of {subject}?"]),
            pick([f"People in {subject} speak {value}.", f"{value}.", f"The main language of {subject} is {value}."]),
        )
    return (pick([f"On which continent is {subject}?", f"Which continent is {subject} in?"]),
            pick([f"{subject} is in {value}.", f"{value}.", f"{subject} is a country in {value}."]))  # fmt: skip


ASKED = 3  # each fact is asked this many times with its true value and as many with a wrong one


def correctness_examples(seed: int = SEED) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...]}: {"messages", "response": "Y" | "N"}. Every fact is asked ASKED
    times with the true value and ASKED times with a wrong one (another subject's value of the same
    relation), in random phrasings; held-out facts are (relation, subject) pairs training never asks."""
    rng = np.random.default_rng([seed, 1])
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for relation, truth in _facts().items():
        subjects = sorted(truth)
        held = _held_out(subjects, rng)
        values = sorted(set(truth.values()) | set(_facts(known_only=False)[relation].values()))
        for subject in subjects:
            true = truth[subject]
            split = "heldout" if subject in held else "train"
            wrong = [v for v in values if v != true]
            for _ in range(ASKED):
                for value, verdict in ((true, "Y"), (wrong[int(rng.integers(len(wrong)))], "N")):
                    question, answer = _qa(relation, subject, value, rng)
                    out[split].append({"messages": _conversation(question, answer), "response": verdict})
    for split in out:
        out[split] = [out[split][i] for i in np.random.default_rng([seed, 2]).permutation(len(out[split]))]
    return out


def check_facts(model: str) -> dict[str, list[str]]:
    """relation -> subjects the base model gets wrong, asked each fact's first phrasing (greedy)."""
    from checkpoints import bundled
    from jalora import LLM, SamplingParams

    found = bundled.resolve(model) if model in bundled.names() else None
    llm = LLM(found.model if found else model, dtype="float32", max_num_seqs=64, max_model_len=256, warmup=False)
    rows = [(r, s, v) for r, t in _facts(known_only=False).items() for s, v in t.items()]
    prompts = [llm.engine.apply_chat_template(_conversation(_qa(r, s, v, None)[0], "")[:1]) for r, s, v in rows]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    wrong: dict[str, list[str]] = {r: [] for r in _facts(known_only=False)}
    for (r, s, v), o in zip(rows, outs):
        if v.lower() not in o.text.lower():
            wrong[r].append(s)
    return wrong


def _form_cases(rng: np.random.Generator, fact: tuple) -> list[tuple[str, str, str]]:
    """(question, answer keeping to the form, answer that does not) for one fact, one per form."""
    kind, x, y = fact
    if kind == "sum":
        topic, value, sentence = f"What is {x} + {y}?", str(x + y), f"{x} + {y} is {x + y}."
        one_word = value
    else:
        topic, value, sentence = f"What is the capital of {x}?", y, f"The capital of {x} is {y}."
        one_word = y if " " not in y else y.replace(" ", "")
    long = f"{sentence} This is a well-known fact. You can check it in any reference book."
    cases = [
        (f"{topic} Answer in one sentence.", sentence, long),
        (f"{topic} Answer in capital letters.", sentence.upper(), sentence),
        (f"{topic} Answer in one word.", one_word, sentence),
    ]
    if kind == "sum":
        cases.append((f"{topic} Answer with a single number.", value, sentence))
    else:
        yes = bool(rng.integers(2))
        city = y if yes else "Sydney"
        cases.append((f"Is {city} the capital of {x}? Answer with yes or no.", "Yes." if yes else "No.",
                      f"{city} is a large city with many people and a long history."))  # fmt: skip
    return cases


def format_examples(seed: int = SEED) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...]}: {"messages", "response": "Y" | "N"}, half keeping to the form."""
    rng = np.random.default_rng([seed, 3])
    facts = [("sum", a, b) for a in range(1, 21) for b in range(1, 21) if (a * 7 + b) % 5 == 0]
    facts += [("capital", c, CAPITALS[c]) for c in sorted(CAPITALS)]
    held = _held_out(facts, rng)
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for n, k in enumerate(rng.permutation(len(facts))):
        fact = facts[k]
        for m, (question, kept, broken) in enumerate(_form_cases(rng, fact)):
            right = (n + m) % 2 == 0
            answer = kept if right else broken
            split = "heldout" if fact in held else "train"
            out[split].append({"messages": _conversation(question, answer), "response": "Y" if right else "N"})
    for split in out:
        out[split] = [out[split][i] for i in np.random.default_rng([seed, 4]).permutation(len(out[split]))]
    return out


DATASETS = {"correctness": correctness_examples, "format": format_examples}


def write_data(root: Path) -> dict[str, dict[str, Path]]:
    """root/<judge>/{train,heldout}.jsonl for every judge."""
    paths = {}
    for name, make in DATASETS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        paths[name] = {}
        for split, rows in make().items():
            path = root / name / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[name][split] = path
    return paths


# The settings of the committed judges (the flags of `jalora train`). The correctness judge's were the best
# of three runs on the H200 (held-out accuracy after training, same data and seed): q/k/v/o r=8 at lr 2e-3,
# 8 epochs: 99.1%; every projection r=8 at lr 1e-3, 8 epochs: 95.4%; every projection r=16 at lr 3e-4,
# 10 epochs: 98.1%. The format judge reads surface features, which q/k/v adapters catch.
COMMON_FLAGS = ["--r", "8", "--lora-alpha", "16", "--weight-decay", "0.01", "--warmup-steps", "10",
                "--batch-size", "8", "--grad-accum", "1", "--seed", "0", "--save-dtype", "bfloat16",
                "--save-every", "25", "--max-seq-len", "128"]  # fmt: skip
TRAIN_FLAGS = {
    "correctness": ["--target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--learning-rate", "2e-3",
                    "--epochs", "8", "--eval-every", "54"],
    "format": ["--target-modules", "q_proj", "k_proj", "v_proj", "--learning-rate", "1e-3", "--epochs", "2",
               "--eval-every", "28"],
}  # fmt: skip


def train(model: str, data: dict[str, dict[str, Path]], out: Path, judges: list[str], extra: list[str]) -> dict:
    """Runs `jalora train` for each judge; returns {judge: wall seconds}."""
    times = {}
    for name in judges:
        _, invocation = JUDGES[name]
        cmd = [sys.executable, "-m", "server.cli", "train", "--model", model, "--data", str(data[name]["train"]),
               "--eval-data", str(data[name]["heldout"]), "--output-dir", str(out / name), "--invocation", invocation,
               *COMMON_FLAGS, *TRAIN_FLAGS[name], *extra]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=HERE.parent)
        times[name] = time.perf_counter() - t0
        shutil.rmtree(out / name / "checkpoints", ignore_errors=True)  # resumable until done; not shipped
        neutral_paths(out / name / "training_log.json", model, name, out / name)
    return times


def neutral_paths(log_path: Path, model: str, name: str, adapter_dir: Path) -> None:
    """The training log as shipped: the model as given (a bundled name, not this machine's cache path), the data
    files by their names under the data directory, the output directory relative to the repository (where it is
    inside it), so that the log says nothing of the machine that trained it."""
    log = json.loads(log_path.read_text())
    where = adapter_dir.resolve()
    shown = str(where.relative_to(HERE.parent)) if where.is_relative_to(HERE.parent) else where.name
    log["config"].update(model=model, data=f"{name}/train.jsonl", eval_data=f"{name}/heldout.jsonl", output_dir=shown)
    log["result"]["adapter_dir"] = shown
    log_path.write_text(json.dumps(log, indent=1))  # (as the trainer writes it)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="model to train on (default: smollm2, the bundled default)")
    p.add_argument("--out", default=str(OUT), help=f"where the judges go (default: {OUT})")
    p.add_argument("--judge", action="append", choices=sorted(JUDGES), help="train only these (default: all)")
    p.add_argument("--data-only", metavar="DIR", help="write the data to DIR and stop")
    p.add_argument("--check-facts", action="store_true", help="list the facts the base model gets wrong (UNKNOWN)")
    p.add_argument("extra", nargs="*", help="more `jalora train` flags (after --), e.g. -- --dtype bfloat16")
    args = p.parse_args(argv)
    if args.check_facts:
        wrong = check_facts(args.model)
        print(json.dumps(wrong, indent=1))
        return 0 if all(set(v) == UNKNOWN.get(r, set()) for r, v in wrong.items()) else 1
    if args.data_only:
        write_data(Path(args.data_only))
        return 0
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        times = train(args.model, write_data(Path(tmp)), out, args.judge or sorted(JUDGES), args.extra)
    for name, seconds in times.items():
        print(f"{name}: trained in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
