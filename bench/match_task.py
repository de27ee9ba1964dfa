"""A predictive task in the shape of the paper's applications: does a job match a candidate? (Yes / No)

    .venv/bin/python bench/match_task.py --out runs/match_task      # train / validation / test .jsonl

Each record is a user's own predictive data as slm reads it: {"prompt", "completion": " Yes"|" No",
"label": 1|0}. A candidate has three skills, a city and whether they work remotely; a job needs one or
two skills and sits in a city or is remote. It matches when the candidate has every skill the job
needs and can work where the job is (same city, or a remote job for a candidate who works remotely).
Half the records of each split match; every other one breaks exactly one condition (a missing skill
or the wrong place), so a model must read both parts of the prompt. Splits are drawn from disjoint
seeds; the generator is deterministic in --seed. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SKILLS = (
    "python", "java", "sql", "docker", "kubernetes", "react", "go", "rust", "spark", "excel", "figma", "sales",
    "marketing", "finance", "accounting", "nursing", "welding", "design", "statistics", "linux", "aws", "azure",
    "tableau", "c++", "swift", "kotlin", "seo", "recruiting", "legal", "logistics",
)
CITIES = ("Berlin", "Paris", "London", "Madrid", "Dublin", "Toronto", "Austin", "Boston", "Seattle", "Sydney",
          "Tokyo", "Lisbon", "Warsaw", "Oslo", "Zurich", "Chicago")


def record(rng: random.Random, match: bool) -> dict:
    skills = rng.sample(SKILLS, 3)
    city = rng.choice(CITIES)
    remote_ok = rng.random() < 0.5
    needs = rng.sample(skills, rng.choice((1, 2)))
    job_remote = remote_ok and rng.random() < 0.4
    job_city = "remote" if job_remote else city
    if not match:
        if rng.random() < 0.5:  # one skill the candidate lacks
            needs[rng.randrange(len(needs))] = rng.choice([s for s in SKILLS if s not in skills])
        elif remote_ok and job_remote or not remote_ok and rng.random() < 0.5:
            job_city = rng.choice([c for c in CITIES if c != city])  # another city
        else:
            job_city = "remote"  # a remote job, but the candidate does not work remotely
            remote_ok = False
    prompt = (
        f"Candidate: {', '.join(skills)} | {city} | remote: {'yes' if remote_ok else 'no'}\n"
        f"Job: {', '.join(needs)} | {job_city}\n"
        "Does the job match the candidate? Answer Yes or No.\nAnswer:"
    )
    return {"prompt": prompt, "completion": " Yes" if match else " No", "label": int(match)}


def split(size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = [i % 2 == 0 for i in range(size)]
    rng.shuffle(labels)
    return [record(rng, m) for m in labels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/match_task")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--validation", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate((("train", args.train), ("validation", args.validation), ("test", args.test))):
        rows = split(size, seed=1000 * args.seed + i)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.train} / {args.validation} / {args.test} records to {out}")


if __name__ == "__main__":
    main()
