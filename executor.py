"""Where a step's independent units run (EXECUTOR): "local", one after another in this process, or "ray", on
the workers of a Ray instance (started here, or the cluster at RAY_ADDRESS).

A unit is a module-level function. What many units read (data, networks) is shared once. A unit's result comes
back to the driver (this process), which writes every file; what a long unit saves as it goes (a search's
rounds) and what it logs come back through an inbox as they happen. So workers need no shared filesystem, and
a killed run resumes from the same files with either executor.

    with executor.start(cfg, device, log) as ex:
        images = ex.share(load, ...)                       # an input of many units
        jobs = [ex.submit(name, unit, images, ex.device, ex.save, ex.log, ...) for name in ...]
        results = ex.run(jobs, "units", done)              # done(name, result) in the driver, as each ends;
                                                           # it may append to jobs the units that needed that one
"""
import contextlib
import logging
import os
import socket
from pathlib import Path

import torch
from tqdm import tqdm

import configuration
import store
from configuration import UserError

REPO = Path(__file__).resolve().parent
EXECUTORS = ("local", "ray")
MAX_RETRIES = 3  # a unit whose worker died (not one that raised) is run again, at most this often
SHIPPED_EXCLUDES = ["data/", "results/", "checkpoints/", "benchmarks/", ".git/"]  # the code workers import


def save(path, payload):
    """Write a unit's output: JSON for .json paths, else a torch checkpoint; atomically."""
    (store.write_json if Path(path).suffix == ".json" else store.save_checkpoint)(path, payload)


def check_config(cfg):
    if cfg.EXECUTOR not in EXECUTORS:
        raise UserError(f"EXECUTOR={cfg.EXECUTOR!r}: use one of {', '.join(EXECUTORS)}")
    if cfg.CPUS_PER_UNIT < 1 or cfg.GPUS_PER_UNIT < 0:
        raise UserError(f"CPUS_PER_UNIT={cfg.CPUS_PER_UNIT}, GPUS_PER_UNIT={cfg.GPUS_PER_UNIT}: a unit needs "
                        "at least 1 CPU and no negative number of GPUs")


@contextlib.contextmanager
def start(cfg, device, log):
    """The executor EXECUTOR names, closed (Ray's workers stopped) when the block ends, also on an error."""
    ex = Local(device, log) if cfg.EXECUTOR == "local" else Ray(cfg, device, log)
    try:
        yield ex
    finally:
        ex.close()


# ----------------------------------------------------------------------------- local
class Lazy:
    """A local shared input: made again for each unit that reads it, and held only while that unit runs (a
    network read from disk is not kept in memory between the units that use it)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class Job:
    """A local unit: run when its result is first needed (its inputs first). It drops its inputs once it has
    run, so a result that only finished units read (a source's features) is freed as the units go."""

    def __init__(self, name, fn, args):
        self.name, self.fn, self.args, self.value = name, fn, args, None

    def result(self):
        if self.fn is not None:
            args = [a.result() if isinstance(a, (Job, Lazy)) else a for a in self.args]
            self.value, self.fn, self.args = self.fn(*args), None, None
        return self.value


class Local:
    """Units run in this process, in the order they were submitted, with its threads (THREADS)."""

    def __init__(self, device, log):
        self.device, self.save, self.log = device, save, log

    def share(self, fn, *args):
        """An input of many units, fn(*args)."""
        return Lazy(fn, args)

    def submit(self, name, fn, *args):
        return Job(name, fn, args)

    def run(self, jobs, desc, done):
        """done(name, result) for every job, in order; returns what done returned, in the same order. done may
        append units to `jobs` (those that needed this one): they run in the same call. Empties `jobs`: no unit's
        result is held once done has written it."""
        out = []
        with tqdm(total=len(jobs), desc=desc, unit="unit") as bar:
            while jobs:
                job = jobs.pop(0)
                out.append(done(job.name, job.result()))
                job.value = None
                bar.total = bar.n + 1 + len(jobs)
                bar.update()
        return out

    def close(self):
        pass


# ----------------------------------------------------------------------------- Ray
class WorkerSide:
    """An argument a worker replaces by its own: its device (from DEVICE), its save or its log."""

    def __init__(self, kind, value=None):
        self.kind, self.value = kind, value


class Inbox:
    """A Ray actor on the driver's side: what units send (saves, log lines, where they run), in the order sent."""

    def __init__(self):
        self.messages = []

    def post(self, message):
        self.messages.append(message)

    def take(self):
        out, self.messages = self.messages, []
        return out


class InboxLog(logging.Handler):
    def __init__(self, send):
        super().__init__()
        self.send = send

    def emit(self, record):
        self.send(("log", record.getMessage()))


def run_unit(fn, name, inbox, threads, *args):
    """A unit on a Ray worker: `threads` CPU threads, worker-side arguments resolved, saves and log lines posted
    to the driver's inbox. Posts do not wait (a task that waits lends its CPU to another, oversubscribing the
    machine); the unit returns once all of them have arrived, so the driver has its saves before its result."""
    import ray
    posted = []
    send = lambda message: posted.append(inbox.post.remote(message))
    torch.set_num_threads(threads)
    log = logging.getLogger(f"unit.{os.getpid()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.addHandler(InboxLog(send))

    def resolve(arg):
        if not isinstance(arg, WorkerSide):
            return arg
        if arg.kind == "device":
            return configuration.get_device(arg.value)
        return log if arg.kind == "log" else lambda path, payload: send(("save", str(path), payload))
    args = [resolve(a) for a in args]
    device = next((a for a in args if isinstance(a, torch.device)), None)
    gpu = f" {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    send(("start", name, f"{socket.gethostname()}:{os.getpid()}{gpu}"))
    result = fn(*args)
    send(("end", name))
    ray.get(posted)
    return result


class Ray:
    """Units run as Ray tasks, CPUS_PER_UNIT threads and GPUS_PER_UNIT GPUs each, as many at once as the
    instance has room for; the code is shipped to the workers (runtime_env working_dir)."""

    def __init__(self, cfg, device, log):
        import ray  # only this executor needs it
        self.ray, self.driver_log = ray, log
        if device.type == "cuda" and not cfg.GPUS_PER_UNIT:
            log.warning("warning: GPUS_PER_UNIT=0: Ray's units will not see this machine's GPU and run on CPUs; "
                        "set GPUS_PER_UNIT=1 for one unit per GPU")
        # "local": a new instance even where `ray start` left one running (None would join that one)
        ray.init(address=cfg.RAY_ADDRESS or "local", include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env=dict(working_dir=str(REPO), excludes=SHIPPED_EXCLUDES,
                                  env_vars={"TQDM_DISABLE": "1"}))  # the driver's bar is the one to read
        resources = ray.cluster_resources()
        log.info("Ray: %s, %d CPUs, %d GPUs; a unit takes %d CPU(s) and %g GPU(s)", cfg.RAY_ADDRESS or "a local instance",
                 resources.get("CPU", 0), resources.get("GPU", 0), cfg.CPUS_PER_UNIT, cfg.GPUS_PER_UNIT)
        self.inbox = ray.remote(Inbox).options(num_cpus=0).remote()
        self.remote = ray.remote(run_unit)
        self.options = dict(num_cpus=cfg.CPUS_PER_UNIT, num_gpus=cfg.GPUS_PER_UNIT, max_retries=MAX_RETRIES)
        self.threads = cfg.CPUS_PER_UNIT
        self.device, self.save, self.log = WorkerSide("device", cfg.DEVICE), WorkerSide("save"), WorkerSide("log")
        self.names, self.running = {}, {}  # names by the hex of a unit's ref: a ref itself would pin its result

    def share(self, fn, *args):
        """An input of many units, fn(*args): made once, here, into the object store, where units read it."""
        return self.ray.put(fn(*args))

    def submit(self, name, fn, *args):
        ref = self.remote.options(name=name, **self.options).remote(fn, name, self.inbox, self.threads, *args)
        self.names[ref.hex()] = name
        return ref

    def drain(self):
        """Write the saves and log the lines the units sent; note which units run, and where."""
        for message in self.ray.get(self.inbox.take.remote()):
            if message[0] == "save":
                save(*message[1:])
            elif message[0] == "log":
                self.driver_log.info("%s", message[1])
            elif message[0] == "start":
                self.running[message[1]] = message[2]
            else:  # a unit ended, also one that others wait for (features)
                self.running.pop(message[1], None)

    def run(self, jobs, desc, done):
        """done(name, result) for every job as it ends; returns what done returned, in the order the jobs were
        submitted. done may append units to `jobs` (those that needed this one): they join this call. A unit that
        raised stops the run with its own error (a UserError prints as one clear message). Empties `jobs`, so that
        no unit's result stays in the object store once done has written it."""
        pending, out, order = [], {}, []
        with tqdm(total=len(jobs), desc=desc, unit="unit") as bar:
            while jobs or pending:
                order += [ref.hex() for ref in jobs]
                pending += jobs
                jobs.clear()
                bar.total = len(order)
                ready, pending = self.ray.wait(pending, num_returns=1, timeout=1.0)
                self.drain()
                for ref in ready:
                    name = self.names.pop(ref.hex())
                    try:
                        result = self.ray.get(ref)
                    except self.ray.exceptions.RayTaskError as e:
                        raise (e.cause if isinstance(e.cause, UserError) else e) from None
                    out[ref.hex()] = done(name, result)
                    del result
                    bar.update()
                bar.set_postfix_str("; ".join(f"{n} on {w}" for n, w in self.running.items())[:160], refresh=True)
        return [out[key] for key in order]

    def close(self):
        self.ray.shutdown()
