#!/usr/bin/env python3
"""Benchmark mdserve against baselines measured in the same run, and print one table.

Usage:  python bench_mdserve.py                  (about three minutes)
        python bench_mdserve.py --notes 100000   (the large-folder targets; a few minutes more)

Builds its notes in a temporary folder, starts every server on 127.0.0.1 (each in its
own process), and drives them with wrk when it is installed (apt-get install wrk), else
with a small built-in keep-alive client.  Each load run is `wrk -t1 -c8 -d8s`; the
servers and the load generator share this machine's cores.  Every figure is compared
with a baseline from this same run.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mdserve  # noqa: E402  (the renderer's settings are compared with a bare render)
markdown = mdserve.markdown  # None without the package: main() says so, after --help

SECONDS = 8   # as wrk -d8s
WORDS = ("the quick brown fox jumps over lazy dog notes server markdown python cache index "
         "search folder private public render table code link image").split()

BARE_SERVER = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = open(sys.argv[1], "rb").read()
class Bare(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive
    disable_nagle_algorithm = True     # no Nagle stall
    wbufsize = 1 << 16                 # headers and body in one write
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Bare)
print("port", server.server_address[1], flush=True)
server.serve_forever()
'''


# Notes to serve ###############################################################

def note_text(size, seed):
    """Return markdown of about size bytes: headings, paragraphs, lists, tables, code."""
    rng, parts, i = random.Random(seed), ["# Benchmark note\n"], 0
    while sum(map(len, parts)) < size:
        i += 1
        parts.append(f"\n## Section {i}\n\n" + " ".join(rng.choice(WORDS) for _ in range(60)) + ".\n")
        parts.append("\n- item one with `code`\n- item **two**\n- [a link](other.md)\n")
        if i % 3 == 0:
            parts.append("\n| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |\n| 4 | 5 | 6 |\n")
        if i % 4 == 0:
            parts.append("\n```python\ndef f(x):\n    return x * 2\n```\n")
    return "".join(parts)[:size]


def build_trees(base):
    """Write the page notes and the 10,000-note tree under base; return their folders."""
    pages, tree = os.path.join(base, "pages"), os.path.join(base, "tree")
    os.makedirs(pages)
    page = note_text(8800, 1)
    write(os.path.join(pages, "page.md"), page)
    write(os.path.join(pages, "private.md"), "password: 1234\n" + page)
    write(os.path.join(pages, "big.md"), note_text(500_000, 2))
    for i in range(5):
        write(os.path.join(pages, f"first{i}.md"), note_text(8000, 10 + i))
    os.makedirs(os.path.join(pages, "folder"))
    rng = random.Random(3)
    for d in range(100):
        for n in range(100):
            extra = "\nzebrafish sighting\n" if (d * 100 + n) % 97 == 0 else ""
            # Every fifth note is private, and only private notes hold the word "okapi".
            private = (d * 100 + n) % 5 == 0
            head = f"password: k{n}\n" if private else ""
            extra += "\nokapi\n" if private else ""
            body = head + f"# Note {d}-{n}\n\n" + " ".join(rng.choice(WORDS) for _ in range(300)) + extra + "\n"
            write(os.path.join(tree, f"d{d:03}", f"n{n:03}.md"), body)
    return pages, tree


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


# Servers and load ############################################################

STARTED = []  # every server process, stopped at the end however the run ends


def start(args, ready=r"port (\d+)|http://127\.0\.0\.1:(\d+)"):
    """Start a server process; return (process, port) once it has said its port."""
    process = subprocess.Popen([sys.executable, "-u", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    STARTED.append(process)
    for line in process.stdout:
        match = re.search(ready, line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            return process, int(match.group(1) or match.group(2))
    raise RuntimeError(f"{args[0]} did not start")


def stop(process):
    process.terminate()
    process.wait(10)


def fetch(port, path, headers=None, method="GET"):
    """Return (status, headers, body, seconds) of one request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    seconds = time.perf_counter() - started
    connection.close()
    return response.status, dict(response.getheaders()), body, seconds


def load(port, path, headers=(), method="GET", seconds=SECONDS):
    """Return (requests a second, p99 latency in ms) under 8 keep-alive connections."""
    if shutil.which("wrk"):
        command = ["wrk", "-t1", "-c8", f"-d{seconds}s", "--latency"]
        for header in headers:
            command += ["-H", header]
        script = None
        if method != "GET":
            script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
            script.write(f'wrk.method = "{method}"\n')
            script.close()
            command += ["-s", script.name]
        out = subprocess.run(command + [f"http://127.0.0.1:{port}{path}"], capture_output=True,
                             text=True, timeout=seconds + 30).stdout
        if script:
            os.unlink(script.name)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()
        return rate, float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    return builtin_load(port, path, dict(h.split(": ", 1) for h in headers), method, seconds)


def builtin_load(port, path, headers, method, seconds):
    """The fallback load generator: 8 threads, each a keep-alive connection."""
    latencies, deadline = [], time.perf_counter() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            connection.request(method, path, headers=headers)
            connection.getresponse().read()
            latencies.append(time.perf_counter() - started)
        connection.close()
    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / seconds, sorted(latencies)[int(len(latencies) * 0.99)] * 1000


def startup_seconds(folder):
    """Return the seconds from starting mdserve on folder to its first 200 for /."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "mdserve.py"), folder, "-b", "127.0.0.1",
                                "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < 10:
            try:
                if fetch(port, "/")[0] == 200:
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.005)
        return float("inf")
    finally:
        stop(process)


def key_timing(port, rounds=41):
    """Return the median ms of a keyless search for a word that 2,000 private notes hold, and
    for a word no note holds, over interleaved requests: they should be the same."""
    times = {"okapi": [], "qzxqzxq": []}
    for word in times:
        fetch(port, f"/?q={word}")
    for _ in range(rounds):
        for word in times:
            times[word].append(fetch(port, f"/?q={word}")[3])
    return statistics.median(times["okapi"]) * 1000, statistics.median(times["qzxqzxq"]) * 1000


def median_ms(port, path, times=7):
    fetch(port, path)  # warm
    return statistics.median(fetch(port, path)[3] for _ in range(times)) * 1000


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


# The run #####################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark mdserve against baselines from the same run.")
    parser.add_argument("--notes", type=note_count, metavar="N",
                        help="instead, measure a folder of N notes (200 a folder, at least 200; try 100000)")
    args = parser.parse_args(argv)
    problem = mdserve.markdown_problem()
    if problem:
        print(f"bench_mdserve: {problem}", file=sys.stderr)
        return 2
    try:
        return large_folder(args.notes) if args.notes is not None else default_run()
    finally:
        for process in STARTED:  # stopped already, unless the run broke off
            stop(process)


def default_run():
    """Measure the default targets (10,000 notes) against their baselines."""
    rows = []
    row = recorder(rows, "baseline")

    base = tempfile.mkdtemp(prefix="mdserve-bench-")
    try:
        pages, tree = build_trees(base)
        md, md_port = start([os.path.join(HERE, "mdserve.py"), pages, "-b", "127.0.0.1", "-p", "0"])
        page = fetch(md_port, "/page.md")[2]
        static = os.path.join(base, "static")
        write(os.path.join(static, "page.html"), page.decode())
        plain, plain_port = start(["-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", static],
                                  ready=r"port (\d+)")
        bare_file = os.path.join(base, "bare.py")
        write(bare_file, BARE_SERVER)
        bare, bare_port = start([bare_file, os.path.join(static, "page.html")])
        fetch(md_port, "/private.md?access_key=1234")

        # 1, 2: warm pages.  Best of four rounds each, so drift on a shared machine hits all alike.
        print(f"load: {'wrk' if shutil.which('wrk') else 'built-in client'}, 8 connections, {SECONDS} s a run",
              file=sys.stderr)
        static_rate, _ = load(plain_port, "/page.html")
        targets = {"bare": (bare_port, "/"), "public": (md_port, "/page.md"),
                   "private": (md_port, "/private.md?access_key=1234")}
        runs = {name: [] for name in targets}
        for round_number in range(4):  # each round in another order: no target always goes first
            names = list(targets)[round_number % 3:] + list(targets)[:round_number % 3]
            for name in names:
                runs[name].append(load(*targets[name]))
        bare_rate = max(r for r, _ in runs["bare"])
        public_rate, public_p99 = max(runs["public"])
        private_rate, private_p99 = max(runs["private"])
        row("1a warm page vs http.server static", f"{public_rate:,.0f} req/s", f"{static_rate:,.0f} req/s",
            f"{public_rate / static_rate:.2f}x", public_rate >= 4 * static_rate)
        row("1b warm page vs bare keep-alive handler", f"{public_rate:,.0f} req/s", f"{bare_rate:,.0f} req/s",
            f"{public_rate / bare_rate:.2f}x", public_rate >= 0.75 * bare_rate)
        etag = fetch(md_port, "/page.md")[1]["ETag"]
        p99s = {"GET page": public_p99, "GET private": private_p99}
        for name, path, headers, method in [("HEAD page", "/page.md", (), "HEAD"),
                                            ("304", "/page.md", (f"If-None-Match: {etag}",), "GET"),
                                            ("404", "/missing.md", (), "GET"), ("301", "/folder", (), "GET")]:
            status = fetch(md_port, path, dict(h.split(": ", 1) for h in headers), method)[0]
            assert status in (200, 304, 404, 301), status
            p99s[f"{name} ({status})"] = load(md_port, path, headers, method, seconds=3)[1]
        worst = max(p99s, key=p99s.get)
        row("1c p99 latency under load, worst route", f"{p99s[worst]:.2f} ms ({worst})", "10 ms",
            f"{p99s[worst] / 10:.2f}x", p99s[worst] < 10)
        row("2  private note with key vs public", f"{private_rate:,.0f} req/s", f"{public_rate:,.0f} req/s",
            f"{private_rate / public_rate:.2f}x", private_rate >= 0.9 * public_rate)

        # 3: first and second views; the render with mdserve's dialect against plain Python-Markdown.
        renderer = markdown.Markdown(extensions=["extra", "toc", "sane_lists"]
                                     + (["codehilite"] if mdserve.HtmlFormatter else []))
        texts = [open(os.path.join(pages, f"first{i}.md"), encoding="utf-8").read() for i in range(5)]
        renders, dialect, firsts = [], [], []
        for text in texts:  # both renderers warmed; mdserve's is the GitHub and Obsidian dialect on top
            renderer.reset().convert(text)
            mdserve.render_markdown(text)
        for number, text in enumerate(texts):  # all three interleaved: each sees the same machine
            firsts.append(fetch(md_port, f"/first{number}.md")[3])
            for _ in range(2):
                for render, times in ((lambda t: renderer.reset().convert(t), renders),
                                      (mdserve.render_markdown, dialect)):
                    started = time.perf_counter()
                    render(text)
                    times.append(time.perf_counter() - started)
        render_ms, dialect_ms = statistics.median(renders) * 1000, statistics.median(dialect) * 1000
        first_ms = statistics.median(firsts) * 1000
        limit = 1.2 * dialect_ms + 2
        row("3a first view of an 8 KB note vs its render", f"{first_ms:.2f} ms", f"render {dialect_ms:.2f} ms",
            f"{first_ms / dialect_ms:.2f}x", first_ms <= limit)
        big_first = fetch(md_port, "/big.md")[3]
        big_second = min(fetch(md_port, "/big.md")[3] for _ in range(3))
        row("3b 500 KB note, second view vs first", f"{big_second * 1000:.2f} ms", f"{big_first * 1000:.0f} ms",
            f"{big_first / big_second:.0f}x faster", big_first >= 100 * big_second)
        row("3c render of an 8 KB note, with the dialect vs without", f"{dialect_ms:.2f} ms",
            f"{render_ms:.2f} ms", f"{dialect_ms / render_ms:.2f}x", dialect_ms <= 1.25 * render_ms)
        for process in (md, plain, bare):
            stop(process)

        # 4: the 10,000-note tree.
        big, big_port = start([os.path.join(HERE, "mdserve.py"), tree, "-b", "127.0.0.1", "-p", "0"])
        while fetch(big_port, "/?q=zebrafish")[2].count(b"<li>") < 50:   # wait for the first index
            time.sleep(0.1)
        listing_ms = median_ms(big_port, "/")
        row("4a root listing, 10,000 notes, warm", f"{listing_ms:.2f} ms", "20 ms", f"{listing_ms / 20:.2f}x",
            listing_ms <= 20)
        search_ms = median_ms(big_port, "/?q=zebrafish")
        greps = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(["grep", "-rli", "zebrafish", tree], capture_output=True)
            greps.append(time.perf_counter() - started)
        grep_ms = statistics.median(greps) * 1000
        row("4b one-word search, whole tree, warm", f"{search_ms:.2f} ms", f"grep -rli {grep_ms:.2f} ms",
            f"{search_ms / grep_ms:.2f}x", search_ms <= grep_ms and search_ms <= 50)
        for d in range(100):
            fetch(big_port, f"/d{d:03}/")
        for word in ("quick", "zebrafish", "markdown+cache", "nothing-matches"):
            fetch(big_port, f"/?q={word}")
        rss = rss_mb(big.pid)
        row("4c server RSS after listing and searching all", f"{rss:.0f} MB", "150 MB", f"{rss / 150:.2f}x",
            rss <= 150)
        private_only, absent = key_timing(big_port)
        row("4d keyless search: a word only private notes hold vs no such word", f"{private_only:.2f} ms",
            f"{absent:.2f} ms", f"{private_only / absent:.2f}x", private_only <= 1.25 * absent)
        stop(big)

        # 5: start-up.
        bundled = statistics.median(startup_seconds(os.path.join(HERE, "notes")) for _ in range(3))
        row("5a start-up to first 200, bundled notes", f"{bundled:.3f} s", "0.3 s", f"{bundled / 0.3:.2f}x",
            bundled <= 0.3)
        large = startup_seconds(tree)
        row("5b start-up to first 200, 10,000 notes", f"{large:.3f} s", "1.5 s", f"{large / 1.5:.2f}x", large <= 1.5)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    return print_table(rows)


def recorder(rows, against):
    """Return row(target, measured, baseline or limit, ratio, ok): adds a row and says it as it goes."""
    def row(target, measured, compared, ratio, ok):
        rows.append((target, measured, compared, ratio, "pass" if ok else "FAIL"))
        print(f"  {target}: {measured} ({against} {compared}) -> {'pass' if ok else 'FAIL'}", file=sys.stderr)
    return row


def print_table(rows, header=None):
    header = header or HEADER
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    for line in [header, tuple("-" * w for w in widths)] + rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
    print(json.dumps({"failed": [r[0] for r in rows if r[4] != "pass"]}))
    return 0 if all(r[4] == "pass" for r in rows) else 1


# The large folder (--notes) ####################################################

def build_large(base, count):
    """Write count notes of about 4 KB, 200 a folder, each linking to two others."""
    rng = random.Random(7)
    vocabulary = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 10)))
                          for _ in range(20000)]
    folders = max(1, count // 200)
    for number in range(count):
        folder, n = divmod(number, 200)
        parts, size = [f"# Note {folder}-{n}\n"], 0
        while size < 3900:
            words = " ".join(rng.choice(vocabulary) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(80))
            parts.append(f"\n## Section\n\n{words}.\n\n- see [[Note {rng.randrange(folders)}-{rng.randrange(200)}]]\n")
            size += len(words) + 60
        if number % 1000 == 0:
            parts.append("\nzebrafish sighting\n")
        write(os.path.join(base, f"area{folder:03d}", f"note{n:03d}.md"), "".join(parts))


def note_count(text):
    """argparse type for --notes: a whole number of notes, at least one folder's 200."""
    if not text.isdigit() or int(text) < 200:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of notes, at least 200")
    return int(text)


def large_folder(count):
    """Measure the large-folder targets: start-up, search while and after indexing, memory."""
    rows = []
    row = recorder(rows, "target")

    base = tempfile.mkdtemp(prefix="mdserve-bench-large-")
    middle, edited = divmod(count // 2, 200)  # a folder and a note that every count has
    folder = f"area{middle:03d}"
    try:
        started = time.perf_counter()
        build_large(base, count)
        print(f"built {count:,} notes in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        first = statistics.median(startup_seconds(base) for _ in range(3))
        row("start-up to first 200", f"{first:.3f} s", "1 s", f"{first:.2f}x", first <= 1)
        started = time.perf_counter()
        server, port = start([os.path.join(HERE, "mdserve.py"), base, "-b", "127.0.0.1", "-p", "0"])
        time.sleep(max(0.0, 1 - (time.perf_counter() - started)))
        status, _, body, seconds = fetch(port, "/?q=zebrafish")
        partial = re.search(rb"Indexing: [\d,]+ of [\d,]+ notes so far", body)
        row("a search 1 s after start", f"{seconds * 1000:.0f} ms" + (" (says it is indexing)" if partial else ""),
            "2 s", f"{seconds / 2:.2f}x", status == 200 and seconds <= 2)
        peak = 0.0
        while b"Indexing:" in fetch(port, "/?q=zebrafish")[2]:
            peak = max(peak, rss_mb(server.pid))
            time.sleep(0.5)
        complete = time.perf_counter() - started
        row("the index is complete", f"{complete:.0f} s", "90 s", f"{complete / 90:.2f}x", complete <= 90)
        for name, path, limit in [("warm search, a rare word", "/?q=zebrafish", 50),
                                  ("warm search, a word in every note", "/?q=note", 250),
                                  ("warm search, one folder of 200 notes", f"/{folder}/?q=quick", 50),
                                  ("listing a 200-note folder", f"/{folder}/", 20)]:
            took = median_ms(port, path)
            row(name, f"{took:.1f} ms", f"{limit} ms", f"{took / limit:.2f}x", took <= limit)
        time.sleep(5)
        idle = fetch(port, "/?q=quick+brown+fox")[3] * 1000
        row("a search after 5 s idle", f"{idle:.1f} ms", "100 ms", f"{idle / 100:.2f}x", idle <= 100)
        rss = rss_mb(server.pid)
        row("server RSS (peak while indexing)", f"{rss:.0f} MB ({peak:.0f} MB)", "300 MB", f"{max(rss, peak) / 300:.2f}x",
            max(rss, peak) <= 300)
        word = "edit" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10))
        with open(os.path.join(base, folder, f"note{edited:03d}.md"), "a", encoding="utf-8") as file:
            file.write(f"\n{word}\n")
        started = time.perf_counter()
        while f"{folder}/note{edited:03d}.md".encode() not in fetch(port, f"/?q={word}")[2] and \
                time.perf_counter() - started < 30:
            time.sleep(0.1)
        found = time.perf_counter() - started
        row("an edited note found by search", f"{found:.1f} s", "5 s", f"{found / 5:.2f}x", found <= 5)
        stop(server)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return print_table(rows, ("target", "measured", "limit", "ratio", "result"))


HEADER = ("target", "measured", "baseline", "ratio", "result")

if __name__ == "__main__":
    sys.exit(main())
