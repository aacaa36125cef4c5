"""A projection of the paper preset's wall-clock with EXECUTOR = "ray" on W workers, from per-unit costs and the
order the units depend on (a projection: no run of this size was made).

python benchmarks/project_scaleout.py [--workers=1,8,64] [--round-hours=10] [--pair-minutes=4]

Each unit takes one worker (a 2-core CPU like the reference machine of docs/performance.md) for its cost; a unit starts once
the units it needs are done; free workers take the ready unit with the longest remaining path first. Costs
(docs/performance.md), per unit on the reference machine in fp32:
  step 1  a task: one epoch on 54,000 images and its evaluation, 90 s
  step 2  a network's features on a dataset: 25 s; a pair: --pair-minutes (training, 67 s, and its sweep)
  step 3  a FUSE round at C = 64, N = 3: --round-hours (10 h at the matmul roofline when every round runs 5
          alternations: an upper bound); a search is 10 rounds in a row, so a search is one chain of units;
          the random search trains as many candidates as the standard search, alone: its 10 rounds' worth;
          a row retrained with one seed (10 epochs on 54,000 images): the FUSE rows 4 h, ResNet-18 1.3 h,
          ResNet-34 2.6 h, DenseNet-161 4 h (FLOP at the roofline)
"""
import argparse

TASKS = ["mnist0", "mnist1", "mnist2", "mnist3", "mnist4", "tshirt", "trouser", "pullover", "dress", "coat", "sandal"]
ROWS_HOURS = {"fuse_task_aware": 4, "fuse_standard": 4, "random": 4, "resnet18": 1.3, "resnet34": 2.6,
              "densenet161": 4}
SEEDS, ROUNDS, K = 3, 10, 3


def units(args):
    """{name: (hours, [names it needs])} for the three steps of the paper preset, one step after another."""
    u = {f"train {t}": (90 / 3600, []) for t in TASKS}
    step1 = list(u)
    for dataset, targets in (("mnist", TASKS[:5]), ("fashion", TASKS[5:])):
        for t in TASKS:
            u[f"features {t} on {dataset}"] = (25 / 3600, step1)
        for s in TASKS[:10]:
            for t in targets:
                u[f"pair {s} {t}"] = (args.pair_minutes / 60, [f"features {s} on {dataset}", f"features {t} on {dataset}"])
    step2 = [n for n in u if n.startswith("pair")]

    def search(name, rounds, needs):
        for r in range(1, rounds + 1):
            u[f"{name} round {r}"] = (args.round_hours, needs if r == 1 else [f"{name} round {r - 1}"])
        return f"{name} round {rounds}"
    dictionary = [search(f"dictionary {i}", ROUNDS, step2) for i in range(K)]
    aware = search("task-aware", ROUNDS, dictionary)
    standard = search("standard", ROUNDS, step2)
    u["random search"] = (ROUNDS * args.round_hours, [standard])
    needs = {"fuse_task_aware": [aware], "fuse_standard": [standard], "random": ["random search"]}
    for row, hours in ROWS_HOURS.items():
        for seed in range(SEEDS):
            u[f"{row} seed {seed}"] = (hours, needs.get(row, step2))
    return u


def schedule(u, workers):
    """Makespan (hours) of a list schedule on `workers`, longest remaining path first."""
    path = {}

    def longest(name):  # the unit's hours plus the longest chain of units that need it
        if name not in path:
            path[name] = u[name][0] + max((longest(m) for m, (_, needs) in u.items() if name in needs), default=0)
        return path[name]
    for name in u:
        longest(name)
    done, running, clock = set(), [], 0.0  # running: (end, name)
    waiting = set(u)
    while waiting or running:
        ready = sorted((n for n in waiting if all(d in done for d in u[n][1])), key=lambda n: -path[n])
        for name in ready[:workers - len(running)]:
            running.append((clock + u[name][0], name))
            waiting.discard(name)
        clock, finished = min(running)
        running.remove((clock, finished))
        done.add(finished)
    return clock, max(path.values())


def step_of(name):
    return "step 1" if name.startswith("train") else "step 2" if name.startswith(("features", "pair")) else "step 3"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,8,64")
    p.add_argument("--round-hours", type=float, default=10.0)
    p.add_argument("--pair-minutes", type=float, default=4.0)
    args = p.parse_args()
    u = units(args)
    steps = ("step 1", "step 2", "step 3")
    print(f"{len(u)} units; {sum(h for h, _ in u.values()):.0f} worker-hours in all")
    print("| workers | " + " | ".join(steps) + " | total (projection) | critical path |")
    print("|---|---|---|---|---|---|")
    for w in map(int, args.workers.split(",")):
        parts = [schedule({n: (h, [d for d in needs if step_of(d) == step]) for n, (h, needs) in u.items()
                           if step_of(n) == step}, w)[0] for step in steps]  # each step waits for the one before
        hours, critical = schedule(u, w)
        print(f"| {w} | " + " | ".join(f"{h:.1f} h" for h in parts) +
              f" | {hours:.0f} h ({hours / 24:.1f} days) | {critical:.0f} h |")


if __name__ == "__main__":
    main()
