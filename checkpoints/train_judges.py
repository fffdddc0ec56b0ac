"""The trained aLoRA judges of the default model (SmolLM2-135M-Instruct): their data, and `jalora train`.

    python -m checkpoints.train_judges                 # data + both judges into checkpoints/smollm2_judges
    python -m checkpoints.train_judges --data-only DIR # only the JSON-lines data

Nothing is downloaded but the default model itself: every example is generated here from a seed, and
the script knows each one's truth.

- `correctness`: a user asks an addition ("What is 7 + 8?") or a country's capital; the assistant's
  answer is right or wrong (a sum off by a little, another country's capital), in several phrasings.
  The judge answers Y (right) or N.
- `format`: a user asks for an answer in a given form (a single number, one word, one sentence, yes or
  no, capital letters); the assistant's answer keeps to it or not, whatever its content. Y or N.

Each judge reads the conversation with the base model's KV and answers in a turn of its own, opened by
its invocation `<|im_start|>{name}\\n` (the chat template's opening of a turn), as `jalora demo` asks
it. Held-out questions (sums and countries) never occur in training, so the held-out accuracy that
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
HELD_OUT = 0.2  # share of sums and of countries kept out of training

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


def _facts() -> dict[str, dict[str, str]]:
    """relation -> {subject: the true value}: facts the base model holds (its own answers show it)."""
    languages = {c: LANGUAGES[c] for c in sorted(LANGUAGES)}
    continents = {c: CONTINENTS[c] for c in sorted(CAPITALS)}
    sums = {f"{a} + {b}": str(a + b) for a in range(1, 10) for b in range(1, 10)}
    return {"capital": dict(CAPITALS), "language": languages, "continent": continents, "sum": sums}


def _qa(relation: str, subject: str, value: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer stating `value`) in one of a few phrasings."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if relation == "capital":
        return (pick([f"What is the capital of {subject}?", f"What is the capital of {subject}? Answer in one "
                      "sentence.", f"Which city is the capital of {subject}?"]),
                pick([f"The capital of {subject} is {value}.", f"{value}.", f"{value} is the capital of {subject}."]))
    if relation == "language":
        return (pick([f"What language do people speak in {subject}?", f"What is the main language of {subject}?"]),
                pick([f"People in {subject} speak {value}.", f"{value}.", f"The main language of {subject} is "
                      f"{value}."]))
    if relation == "continent":
        return (pick([f"On which continent is {subject}?", f"Which continent is {subject} in?"]),
                pick([f"{subject} is in {value}.", f"{value}.", f"{subject} is a country in {value}."]))
    return (pick([f"What is {subject}?", f"What is {subject}? Answer with a single number."]),
            pick([f"{subject} = {value}.", f"{value}", f"The answer is {value}."]))  # fmt: skip


def correctness_examples(seed: int = SEED) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...]}: {"messages", "response": "Y" | "N"}. Every question is asked
    twice, once with the true value and once with a wrong one (another subject's value of the same
    relation; a sum off by 1 to 3); held-out questions are (relation, subject) pairs training never asks."""
    rng = np.random.default_rng([seed, 1])
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for relation, truth in _facts().items():
        subjects = sorted(truth)
        held = _held_out(subjects, rng)
        values = sorted(set(truth.values()))
        for subject in subjects:
            true = truth[subject]
            if relation == "sum":
                wrong = str(int(true) + int(rng.choice([-3, -2, -1, 1, 2, 3])))
            else:
                wrong = values[int(rng.integers(len(values)))]
                while wrong == true:
                    wrong = values[int(rng.integers(len(values)))]
            split = "heldout" if subject in held else "train"
            for value, verdict in ((true, "Y"), (wrong, "N")):
                question, answer = _qa(relation, subject, value, rng)
                out[split].append({"messages": _conversation(question, answer), "response": verdict})
    for split in out:
        out[split] = [out[split][i] for i in np.random.default_rng([seed, 2]).permutation(len(out[split]))]
    return out


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


# The settings of the committed judges (the flags of `jalora train`). Judging a fact needs the MLPs of
# the few adapted positions (the invocation), not only their attention: the correctness judge adapts every
# projection; the format judge reads surface features, which q/k/v adapters catch.
COMMON_FLAGS = ["--r", "8", "--lora-alpha", "16", "--weight-decay", "0.01", "--warmup-steps", "10",
                "--batch-size", "8", "--grad-accum", "1", "--seed", "0", "--save-dtype", "bfloat16",
                "--save-every", "25", "--eval-every", "28", "--max-seq-len", "128"]  # fmt: skip
TRAIN_FLAGS = {
    "correctness": ["--target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "--learning-rate", "2e-3", "--epochs", "3"],
    "format": ["--target-modules", "q_proj", "k_proj", "v_proj", "--learning-rate", "1e-3", "--epochs", "2"],
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
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="model to train on (default: smollm2, the bundled default)")
    p.add_argument("--out", default=str(OUT), help=f"where the judges go (default: {OUT})")
    p.add_argument("--judge", action="append", choices=sorted(JUDGES), help="train only these (default: all)")
    p.add_argument("--data-only", metavar="DIR", help="write the data to DIR and stop")
    p.add_argument("extra", nargs="*", help="more `jalora train` flags (after --), e.g. -- --dtype bfloat16")
    args = p.parse_args(argv)
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
