#!/usr/bin/env python3
"""mdserve - serve a folder of markdown notes as a small private website.

Usage:  python mdserve.py [DIR] [-p PORT] [-b ADDRESS] [options]

Every note under DIR is rendered to HTML on request; folders list their notes and can
be searched with ?q=words.  A note whose first line is ``password: VALUE`` is private:
it opens only for a request that carries ``?access_key=VALUE``.

Security: the key travels in the URL.  Over plain HTTP anyone who can watch the network
can read it; use --tls-cert/--tls-key, or --bind 127.0.0.1 to keep the server to this
machine.  Public notes, and files such as images, are readable by anyone who can reach
the server.
"""

__version__ = "1.0"
__all__ = ["NoteServer", "NoteHandler", "make_server", "main"]

import argparse
import base64
import collections
import email.utils
import functools
import gzip
import hashlib
import hmac
import html
import io
import ipaddress
import math
import mimetypes
import os
import queue
import re
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as etree
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import markdown
from markdown.inlinepatterns import InlineProcessor

try:  # Pygments is optional: code blocks are styled either way, coloured when it is there.
    from pygments.formatters import HtmlFormatter
except ImportError:
    HtmlFormatter = None


# Constants and template ######################################################

NOTE_SUFFIXES = (".md", ".markdown")
INDEX_NAMES = ("index.md", "README.md", "readme.md")
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32 * 1024
MAX_QUERY_WORDS = 1000          # characters in ?q=
SEARCH_RESULTS = 50
SMALL_FILE = 1024 * 1024        # static files up to this size are read whole (and may be gzipped)
GUESS_LIMIT, GUESS_WINDOW, FIRST_LOCKOUT, LONGEST_LOCKOUT = 10, 60.0, 60.0, 900.0
KNOWN_METHODS = {"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
PASSWORD_LINE = re.compile(r"password:(.*)", re.IGNORECASE)
HEADING = re.compile(r"#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
REFUSED_PATH = re.compile(r"(^|/)\.(?!/|$)|[\\\0]")   # a dot-name, '..', a backslash or a NUL
HTTP_VERSION = re.compile(r"HTTP/\d\.\d")
VALUE_END = re.compile(r"[&;\s]")
KEY_IN_LOG = re.compile(r"([?&;])([^=&;\s]*)=([^&;\s]*)")
WIKI_LINK = r"\[\[([^\]|\n]+)(?:\|([^\]\n]+))?\]\]"
WIKI_PLACEHOLDER = re.compile(r'<a data-wiki="([^"]*)">(.*?)</a>', re.S)
CONTROL_CHARS = str.maketrans({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))})

# Polls its own URL (key included) with the ETag it was served with; reloads when that changes.
RELOAD_SCRIPT = (
    "(function(){var t=document.currentScript.dataset.etag;setInterval(function(){"
    "fetch(location.href,{method:'HEAD',cache:'no-store',headers:{'If-None-Match':t}})"
    ".then(function(r){if(r.status==200||r.status==403||r.status==404)location.reload()},"
    "function(){})},1000)})();")
RELOAD_HASH = "sha256-" + base64.b64encode(hashlib.sha256(RELOAD_SCRIPT.encode()).digest()).decode()

# No script but our own reload poll (by hash), nothing from another origin, no key in a Referer.
CSP = ("default-src 'none'; img-src 'self' data:; media-src 'self'; style-src 'unsafe-inline'; "
       "script-src {script}; connect-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")

FAVICON = "data:image/svg+xml," + urllib.parse.quote(
    "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'><rect x='2' y='1' width='12' "
    "height='14' rx='2' fill='#0969da'/><path d='M5 5h6M5 8h6M5 11h4' stroke='#fff' "
    "stroke-width='1.5'/></svg>")

LOCK = ("<svg class='lock' viewBox='0 0 16 16' width='14' height='14' aria-label='private'>"
        "<path d='M4 7V5a4 4 0 0 1 8 0v2h1v8H3V7zm2 0h4V5a2 2 0 0 0-4 0z' fill='currentColor'/>"
        "</svg>")

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--bg:#fff;--soft:#f6f8fa;--line:#d1d9e0;--link:#0969da;
--mark:#fff3a3;--bad:#cf222e;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;
--soft:#161b22;--line:#30363d;--link:#58a6ff;--mark:#5b4a00;--bad:#ff7b72}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);-webkit-text-size-adjust:100%;
font:17px/1.65 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
header{display:flex;flex-wrap:wrap;gap:.4rem 1rem;align-items:center;justify-content:space-between;
padding:.55rem max(1rem,calc(50% - 23rem));background:var(--soft);border-bottom:1px solid var(--line);
font-size:.9rem}
.crumbs a,.crumbs span{color:var(--muted)}.crumbs b{color:var(--fg);font-weight:600}
header input{font:inherit;padding:.25rem .6rem;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--fg);width:14rem;max-width:100%}
main{max-width:48rem;margin:0 auto;padding:1.2rem 1rem 4rem;overflow-wrap:break-word}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}
h1,h2,h3,h4,h5,h6{line-height:1.25;margin:1.5em 0 .6em}h1{font-size:2em;margin-top:.4em}
h1,h2{border-bottom:1px solid var(--line);padding-bottom:.3em}
.headerlink{margin-left:.35em;color:var(--muted);opacity:0}
:is(h1,h2,h3,h4,h5,h6):hover .headerlink,.headerlink:focus{opacity:1}
code,pre,kbd{font:.87em/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
:not(pre)>code{background:var(--soft);border:1px solid var(--line);border-radius:5px;padding:.1em .3em}
pre{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:.9rem 1rem;overflow-x:auto}
table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%;margin:1em 0}
th,td{border:1px solid var(--line);padding:.35em .75em}tr:nth-child(2n) td{background:var(--soft)}
img,video{max-width:100%;height:auto}hr{border:0;border-top:1px solid var(--line);margin:2em 0}
blockquote{margin:1em 0;padding:0 1em;color:var(--muted);border-left:.25em solid var(--line)}
mark{background:var(--mark);color:inherit;border-radius:2px}
.contents{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:.4rem 1rem;
margin:1rem 0;font-size:.92rem}.contents ul{margin:.2rem 0;padding-left:1.1rem}.contents summary{cursor:pointer}
.list{list-style:none;padding:0}.list li{padding:.5rem 0;border-bottom:1px solid var(--line)}
.list small,.meta{color:var(--muted);font-size:.8rem}.list p{margin:.2rem 0 0;font-size:.92rem}
.list .dir a{font-weight:600}.lock{vertical-align:-2px;margin-right:.25rem;color:var(--muted)}
.broken{color:var(--bad);text-decoration:underline dotted;cursor:help}
.meta{margin-top:3rem;border-top:1px solid var(--line);padding-top:.6rem}
form.key input{font:inherit;padding:.3rem .6rem;margin-right:.4rem}
@media print{header,.meta,.headerlink,.contents{display:none}body{font-size:11pt;background:#fff;color:#000}
main{max-width:none;padding:0}pre,table{overflow:visible}a{color:inherit}}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title><link rel="icon" href="{favicon}"><style>{css}</style></head>
<body><header><nav class="crumbs">{crumbs}</nav>
<form role="search" action="{search_url}" method="get">{key_field}<input type="search" name="q"
 value="{query}" placeholder="Search {folder}" aria-label="Search"></form></header>
<main>{main}</main>{script}
</body></html>
"""

if HtmlFormatter:
    CODE_CSS = (HtmlFormatter(style="friendly").get_style_defs(".highlight")
                + "@media (prefers-color-scheme:dark){"
                + HtmlFormatter(style="monokai").get_style_defs(".highlight") + "}")
else:
    CODE_CSS = ""


class HTTPError(Exception):
    """An answer other than 200, rendered by NoteHandler.send_error."""

    def __init__(self, status, explain=None, main=None, headers=()):
        super().__init__(status)
        self.status, self.explain, self.main, self.headers = status, explain, main, headers


# Notes #######################################################################

class Note:
    """A note's text less its password line, with what listings need to know of it."""
    __slots__ = ("title", "password", "text", "mtime_ns", "size", "too_large")

    def __init__(self, title, password, text, mtime_ns, size, too_large=False):
        self.title, self.password, self.text = title, password, text
        self.mtime_ns, self.size, self.too_large = mtime_ns, size, too_large


def password_of(first_line):
    """Return the password a note's first line sets, or None for a public note."""
    match = PASSWORD_LINE.fullmatch(first_line.lstrip("\ufeff").strip())
    return match.group(1).strip() if match else None


def split_front_matter(text):
    """Return (text without a leading YAML front matter block, its title or None)."""
    if not text.startswith("---\n"):
        return text, None
    end = re.search(r"^(?:---|\.\.\.)[ \t]*$", text[4:], re.M)
    if not end or text[4:4 + end.start()].count("\n") > 200:
        return text, None
    title = re.search(r"^title:[ \t]*['\"]?(.+?)['\"]?[ \t]*$", text[4:4 + end.start()], re.M)
    return text[4 + end.end():].lstrip("\n"), title and title.group(1)


def first_heading(text):
    """Return the plain text of the first heading outside code blocks, or None."""
    fenced, previous = False, ""
    for line in text.split("\n", 400)[:400]:
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            match = HEADING.fullmatch(stripped)
            if match and not line.startswith("    "):
                return re.sub(r"[*`]|\[([^\]]*)\]\([^)]*\)|\{[#.][^}]*\}", r"\1", match.group(1)).strip()
            if previous and re.fullmatch(r"=+|-+", stripped):
                return previous
        previous = stripped if not fenced else ""
    return None


def read_whole(file, limit):
    """Return (stat, up to limit bytes) of an open file, read again while it changes.

    An editor saving in place truncates, then writes: a read across that can join the old
    version's public first line to the new version's private text.  A read counts only
    when the file's stat is the same before and after it and the length agrees.  The file
    must be unbuffered: a buffer would hand the same torn bytes back on a second try.
    """
    for _ in range(20):
        before = os.fstat(file.fileno())
        file.seek(0)
        data = file.read(min(before.st_size, limit) + 1)[:limit]
        after = os.fstat(file.fileno())
        if ((before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
                == (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)
                and len(data) == min(after.st_size, limit)):
            return after, data
        time.sleep(0.001)
    raise PermissionError("the file kept changing while it was read")  # fail closed: 403


def read_note(path, limit):
    """Return the Note in the file at path; past limit bytes, only its head is read."""
    with open(path, "rb", buffering=0) as file:
        status, data = read_whole(file, limit if os.fstat(file.fileno()).st_size <= limit else 65536)
    text = data.decode("utf-8", "replace").replace("\0", "\ufffd").replace("\r\n", "\n")
    text = text[1:] if text.startswith("\ufeff") else text
    first, _, rest = text.partition("\n")
    password = password_of(first)
    body, title = split_front_matter(text if password is None else rest)
    name = os.path.splitext(os.path.basename(path))[0]
    return Note(title or first_heading(body) or name, password, body,
                status.st_mtime_ns, status.st_size, status.st_size > limit)


def may_open(password, key):
    """True when key opens a note with this password (None: public; empty: locked for all)."""
    if password is None:
        return True
    return bool(password) and key is not None and hmac.compare_digest(key.encode(), password.encode())


# Path guard ##################################################################

def guarded(root, path, forbidden=()):
    """Return the real path of path when it lies inside root and may be served, else None.

    Links are resolved first, so a link that leads out of the folder, into a dot-folder
    or to one of the server's own files is refused like the file itself.
    """
    real = os.path.realpath(path)
    if real == root:
        return real
    if not real.startswith(os.path.join(root, "")) or real in forbidden:
        return None
    if any(part.startswith(".") for part in relative(root, real).split("/")):
        return None
    return real


def locate(root, url_path, forbidden=(), known=None):
    """Return (kind, real path, stat) that a URL path means: kind is note, folder or file.

    Raises HTTPError 404 for anything that is not there or must look as if it were not:
    dot-names, '..', backslashes, NULs, paths outside root, fifos and devices.  known, a
    dict, remembers real paths already checked, trusted again only while the path still
    leads to the same inode: one stat instead of an lstat per folder on the way.
    """
    try:
        decoded = urllib.parse.unquote(url_path, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(404) from None
    if REFUSED_PATH.search(decoded):
        raise HTTPError(404)
    path = os.path.join(root, *[p for p in decoded.split("/") if p not in ("", ".")])
    candidates = [path] if url_path.endswith("/") else [path, path + ".md", path + ".markdown"]
    known = {} if known is None else known
    for candidate in candidates:
        try:
            status = os.stat(candidate)
        except OSError:
            continue
        real, device, inode = known.get(candidate, (None, None, None))
        if (device, inode) != (status.st_dev, status.st_ino):
            real = guarded(root, candidate, forbidden)
            if len(known) > 10000:
                known.clear()
            known[candidate] = (real, status.st_dev, status.st_ino)
        if real and stat.S_ISDIR(status.st_mode):
            return "folder", real, status
        if real and stat.S_ISREG(status.st_mode) and not url_path.endswith("/"):
            note = (candidate.lower().endswith(NOTE_SUFFIXES) or real.lower().endswith(NOTE_SUFFIXES))
            return ("note" if note else "file"), real, status
        break
    raise HTTPError(404)


def relative(root, real):
    """Return the '/'-separated path of real below root ('' for root itself)."""
    return real[len(root) + (not root.endswith(os.sep)):].replace(os.sep, "/") if real != root else ""


def note_files(root, folder, forbidden=()):
    """Yield (relative path, real path, stat) for each note under folder.

    Iterative, so very deep trees cannot exhaust the stack; linked folders are not
    entered, so link loops cannot trap it.
    """
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                entries = list(entries)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(NOTE_SUFFIXES):
                    real = guarded(root, entry.path, forbidden) if entry.is_symlink() else entry.path
                    status = os.stat(real) if real else None
                    if status and stat.S_ISREG(status.st_mode):
                        yield relative(root, entry.path), real, status
            except OSError:
                continue


# Rendering ###################################################################

class WikiLinks(InlineProcessor):
    """[[Name]] and [[Name|label]] become placeholders, resolved per request: whether a
    private target may be linked depends on the request's key, not on the cached HTML."""

    def handleMatch(self, match, data):
        link = etree.Element("a")
        link.set("data-wiki", match.group(1).strip())
        link.text = (match.group(2) or match.group(1)).strip()
        return link, match.start(0), match.end(0)


_renderers = queue.SimpleQueue()  # Markdown objects keep state: one per render at a time, reused


def render_markdown(text):
    """Return (HTML, table of contents HTML or '') for markdown text."""
    try:
        md = _renderers.get_nowait()
    except queue.Empty:
        extensions = ["extra", "toc", "sane_lists"] + (["codehilite"] if HtmlFormatter else [])
        md = markdown.Markdown(extensions=extensions, extension_configs={
            "toc": {"permalink": "#", "permalink_title": "Link to this section"},
            "codehilite": {"css_class": "highlight", "guess_lang": False}})
        md.inlinePatterns.register(WikiLinks(WIKI_LINK, md), "wikilink", 175)
    body, toc, stack, headings = md.reset().convert(text), md.toc, list(md.toc_tokens), 0
    _renderers.put(md)  # only a renderer that finished cleanly is used again
    while stack:
        headings += 1
        stack.extend(stack.pop()["children"])
    opened = " open" if headings <= 12 else ""  # a long contents list starts folded, out of the text's way
    contents = f'<details class="contents"{opened}><summary>Contents</summary>{toc}</details>'
    return body, (contents if headings >= 3 else "")


def quote_url(path):
    """Return path quoted for an href (a note named 'a?b#c.md' must stay one path)."""
    return urllib.parse.quote(path, safe="/")


def breadcrumbs(root_name, url_path, key_query):
    """Return the home / folder / note trail for url_path, each step a link."""
    parts = [p for p in urllib.parse.unquote(url_path).split("/") if p]
    links = [f'<a href="/{key_query}">{html.escape(root_name)}</a>']
    for depth, part in enumerate(parts):
        href = "/" + "/".join(parts[:depth + 1]) + ("/" if depth + 1 < len(parts) or url_path.endswith("/") else "")
        label = html.escape(part if depth + 1 < len(parts) else re.sub(r"\.(md|markdown)$", "", part))
        links.append(f'<a href="{html.escape(quote_url(href))}{key_query}">{label}</a>')
    return ' <span>/</span> '.join(links)


def highlight(text, words):
    """Return text HTML-escaped, with each occurrence of words in <mark>."""
    if not words:
        return html.escape(text)
    pieces = re.split("(%s)" % "|".join(map(re.escape, words)), text, flags=re.I)
    return "".join(f"<mark>{html.escape(p)}</mark>" if i % 2 else html.escape(p) for i, p in enumerate(pieces))


def snippet(text, words, width=90):
    """Return an escaped, highlighted excerpt of text around the first of words it holds."""
    lowered = text.casefold()
    found = [i for i in (lowered.find(w.casefold()) for w in words) if i >= 0]
    start = max(0, min(found) - width // 3) if found else 0
    excerpt = " ".join(text[start:start + width * 2].split())
    return ("…" if start else "") + highlight(excerpt, words) + ("…" if start + width * 2 < len(text) else "")


# Caches and index ############################################################

class LRUCache:
    """A thread-safe mapping bounded by the bytes of its values, dropping the least recently used."""

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        item = self.items.get(key)  # single dict operations hold the GIL: only put() needs the lock
        if item is None:
            return None
        try:
            self.items.move_to_end(key)
        except KeyError:  # dropped by a put() meanwhile
            pass
        return item[0]

    def put(self, key, value, size):
        if size > self.max_bytes:
            return value
        with self.lock:
            old = self.items.pop(key, None)
            self.bytes += size - (old[1] if old else 0)
            self.items[key] = (value, size)
            while self.bytes > self.max_bytes:
                self.bytes -= self.items.popitem(last=False)[1][1]
        return value


class NoteIndex:
    """Title, privacy and text of every note, for listings, search and wiki links.

    Entries are refreshed by (mtime, size): a listing re-reads only what changed in its
    folder, a search walks its folder first.  Text goes into an in-memory SQLite FTS5
    table where the Python build has FTS5; otherwise search scans the files.
    """

    def __init__(self, root, note_limit, forbidden=()):
        self.root, self.note_limit, self.forbidden = root, note_limit, forbidden
        self.entries, self.by_rowid, self.stems = {}, {}, collections.defaultdict(set)
        self.lock, self.next_rowid, self.walked = threading.RLock(), 1, {}   # walked: folder -> time
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        for tokenizer in ("unicode61 remove_diacritics 2", "unicode61"):
            try:
                self.db.execute(f"CREATE VIRTUAL TABLE fts USING fts5(title, body, tokenize='{tokenizer}')")
                break
            except sqlite3.OperationalError:
                continue
        else:
            self.db = None

    def entry(self, rel, real, status):
        """Return the (rowid, Note) for a note, re-reading it when it changed since last seen.
        The index keeps no text (FTS5 holds it); a Note just read still has its text."""
        old = self.entries.get(rel)
        if old and (old[1].mtime_ns, old[1].size) == (status.st_mtime_ns, status.st_size):
            return old
        note = read_note(real, self.note_limit)
        with self.lock:
            old = self.entries.get(rel)
            rowid = old[0] if old else self.next_rowid
            self.next_rowid += not old
            kept = Note(note.title, note.password, None, note.mtime_ns, note.size, note.too_large)
            self.entries[rel], self.by_rowid[rowid] = (rowid, kept), rel
            self.stems[os.path.splitext(rel.rsplit("/", 1)[-1])[0].casefold()].add(rel)
            if self.db:
                self.db.execute("DELETE FROM fts WHERE rowid = ?", (rowid,))
                text = "" if note.too_large else note.text.replace("\x01", "").replace("\x02", "")
                self.db.execute("INSERT INTO fts(rowid, title, body) VALUES (?, ?, ?)", (rowid, note.title, text))
        return rowid, note

    def forget(self, rel):
        with self.lock:
            rowid, _ = self.entries.pop(rel)
            del self.by_rowid[rowid]
            self.stems[os.path.splitext(rel.rsplit("/", 1)[-1])[0].casefold()].discard(rel)
            if self.db:
                self.db.execute("DELETE FROM fts WHERE rowid = ?", (rowid,))

    def refresh(self, folder="", max_age=0.0):
        """Bring the entries under folder ('' for all) up to date with the disk, unless it
        (or a folder above it) was walked less than max_age seconds ago."""
        parts = folder.split("/") if folder else []
        scopes = ["/".join(parts[:depth]) for depth in range(len(parts) + 1)]
        if any(time.monotonic() - self.walked.get(scope, -math.inf) < max_age for scope in scopes):
            return
        started = time.monotonic()
        prefix, seen = folder + "/" if folder else "", set()
        for rel, real, status in note_files(self.root, os.path.join(self.root, folder), self.forbidden):
            try:
                self.entry(rel, real, status)
                seen.add(rel)
            except OSError:  # vanished or unreadable since the walk
                continue
        with self.lock:
            for rel in [r for r in self.entries if r.startswith(prefix) and r not in seen]:
                self.forget(rel)
        if len(self.walked) > 10000:
            self.walked.clear()
        self.walked[folder] = started

    def opens_any(self, key):
        """True when key opens at least one private note anywhere in the folder."""
        self.refresh(max_age=2.0)
        with self.lock:
            passwords = [note.password for _, note in self.entries.values() if note.password]
        return any(may_open(password, key) for password in passwords)

    def find(self, name, folder):
        """Return the relative path of the note named name: in folder first, then the shortest anywhere."""
        self.refresh(max_age=2.0)
        with self.lock:
            matches = sorted(self.stems.get(name.casefold(), ()), key=lambda r: (r.count("/"), r))
        local = [r for r in matches if r.rpartition("/")[0] == folder]
        return (local or matches or [None])[0]

    def search(self, words, folder):
        """Return relative paths of the notes under folder holding all words, best first."""
        self.refresh(folder, max_age=1.0)  # a search sees files added or edited within a second
        prefix = folder + "/" if folder else ""
        with self.lock:
            if self.db:
                query = " ".join('"%s"*' % w.replace('"', '""') for w in words)
                try:
                    rows = self.db.execute("SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY bm25(fts, 10.0, 1.0)",
                                           (query,)).fetchall()
                    hits = [self.by_rowid[rowid] for (rowid,) in rows]
                except sqlite3.OperationalError:  # a query of punctuation only
                    hits = []
            else:
                hits = sorted(self.entries)
            notes = {rel: self.entries[rel][1] for rel in hits if rel.startswith(prefix)}
        folded = [w.casefold() for w in words]
        if not self.db:  # no FTS5 in this Python: scan the files, as grep would
            notes = {rel: note for rel, note in notes.items() if all(w in self.text_of(rel) for w in folded)}
        in_title = {rel: all(w in note.title.casefold() for w in folded) for rel, note in notes.items()}
        return sorted(notes, key=lambda rel: not in_title[rel])   # stable: ranking kept within each group

    def text_of(self, rel):
        """Return a note's title and text, casefolded, or '' when it cannot be read."""
        try:
            note = read_note(os.path.join(self.root, rel), self.note_limit)
        except OSError:
            return ""
        return (note.title + "\n" + note.text).casefold()

    def counts(self):
        """Return (public count, private count, relative paths of notes locked for everyone)."""
        with self.lock:
            notes = [(rel, note.password) for rel, (_, note) in self.entries.items()]
        private = [rel for rel, password in notes if password is not None]
        return len(notes) - len(private), len(private), sorted(r for r, p in notes if p == "")


class KeyGuard:
    """Counts wrong keys per client address and locks out a client that keeps guessing.

    Every request with a key counts as a guess when it starts and is forgiven when the key
    proves right: so a burst of concurrent guesses gets no more answers than a slow one.
    The table of clients is bounded: past max_clients the oldest is dropped.  Only starting
    a lock-out takes the lock; the rest are single deque and dict operations, atomic in
    CPython, so keyed requests from many threads do not queue on it.
    """

    def __init__(self, clock=time.monotonic, max_clients=10000):
        self.clock, self.max_clients = clock, max_clients
        self.clients = collections.OrderedDict()   # address -> [guess times, locked until, lockouts]
        self.lock = threading.Lock()

    def attempt(self, address):
        """Count a guess from address; return (seconds it must wait, whether this locked it)."""
        now, client = self.clock(), self.clients.get(address)
        if client is None:
            client = self.clients.setdefault(address, [collections.deque(), 0.0, 0])
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
        if client[1] > now:
            return math.ceil(client[1] - now), False
        guesses = client[0]
        try:
            while now - guesses[0] >= GUESS_WINDOW:
                guesses.popleft()
        except IndexError:  # none left (another thread may have taken the last)
            pass
        if len(guesses) < GUESS_LIMIT:
            guesses.append(now)
            return 0, False
        with self.lock:
            if client[1] > now:  # another thread locked it first
                return math.ceil(client[1] - now), False
            guesses.clear()
            client[2] += 1
            client[1] = now + min(FIRST_LOCKOUT * 2 ** (client[2] - 1), LONGEST_LOCKOUT)
            self.clients.move_to_end(address)
            return math.ceil(client[1] - now), True

    def forgive(self, address):
        """Take back the guess counted for a request whose key was right."""
        client = self.clients.get(address)
        if client and client[0]:
            try:
                client[0].pop()
            except IndexError:  # emptied by another thread meanwhile
                pass


# Request handler #############################################################

class _DeadlineReader(socket.SocketIO):
    """Socket reads sharing one deadline and byte budget per request, so a client that
    sends a byte a second, or headers without end, cannot hold a thread."""
    deadline, budget = None, math.inf

    def readinto(self, buffer):
        # Checked after each read, not by resetting the socket's timeout: settimeout() is a
        # system call that drops the GIL, and every such handoff costs the hot path dearly.
        count = super().readinto(buffer)
        if count is None:  # SO_RCVTIMEO ran out (SocketIO turns EAGAIN into None)
            raise TimeoutError("client idle")
        self.budget -= count
        if self.budget < 0:
            raise HTTPError(431)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError("request not received in time")
        return count


class NoteHandler(BaseHTTPRequestHandler):
    """Answers GET and HEAD for notes, folders and files under server.root."""

    server_version = "mdserve/" + __version__
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so even a garbled request line gets a status line
    disable_nagle_algorithm = True  # never wait ~40 ms for an ACK before the next response

    def setup(self):
        super().setup()
        # The idle timeout is the kernel's (SO_RCVTIMEO/SO_SNDTIMEO): a Python socket timeout
        # would poll() before every recv and send, two more GIL handoffs on every request.
        seconds = self.server.client_timeout
        try:
            timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                self.connection.setsockopt(socket.SOL_SOCKET, option, timeval)
        except (OSError, struct.error):  # a platform without them: Python's own timeout
            self.connection.settimeout(seconds)
        self.reader = _DeadlineReader(self.connection, "rb")
        self.rfile = io.BufferedReader(self.reader)

    def handle(self):
        try:
            super().handle()
        except (OSError, ValueError):  # the client went away, or TLS failed: nothing to answer
            self.close_connection = True

    def handle_one_request(self):
        """Read one request within the deadline and size limits, then answer it."""
        self.reader.deadline = time.monotonic() + self.server.client_timeout
        self.reader.budget = MAX_HEADER_BYTES + MAX_REQUEST_LINE
        self.requestline, self.request_version, self.command = "", "", ""
        self.key, self.url_path, self.query, self.guessing = None, "/", {}, False
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.close_connection = True
                return self.send_error(414)
            if not self.parse_request():
                return
            self.reader.deadline, self.reader.budget = None, math.inf
            self.answer()
            self.wfile.flush()
        except HTTPError as error:  # the header budget ran out
            self.close_connection = True
            self.send_error(error.status)
            self.wfile.flush()
        except (TimeoutError, socket.timeout):
            self.close_connection = True
        finally:
            if self.server.stopping:
                self.close_connection = True

    def answer(self):
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            return self.send_error(405 if self.command in KNOWN_METHODS else 501)
        if self.headers.get("transfer-encoding") or self.headers.get("content-length", "0").strip() != "0":
            self.close_connection = True  # a GET has no body; do not read one
            return self.send_error(413, explain="GET and HEAD requests take no body.")
        self.server.in_flight.add(self)  # set.add and discard need no lock of their own
        try:
            self.route()
        except HTTPError as error:
            self.send_error(error.status, explain=error.explain, main=error.main, headers=error.headers)
        except (ConnectionError, TimeoutError, BlockingIOError, socket.timeout, ssl.SSLError):
            self.close_connection = True  # the client went away, or stopped reading (SO_SNDTIMEO)
        except PermissionError:  # unreadable, or rewritten under us on every try (read_whole)
            self.send_error(403, explain="The server cannot read this right now (no permission, or it is being "
                                         "rewritten: try again)")
        except OSError:  # vanished between the listing and the reading, or a link loop
            self.send_error(404)
        except Exception as exc:  # a bug, or a file that changed mid-read: one request lost, not the server
            self.log_error("internal error: %s", type(exc).__name__)
            self.close_connection = True
            self.send_error(500)
        finally:
            self.server.in_flight.discard(self)
            if self.guessing:  # the key opened what it asked for, or asked for nothing private
                self.server.guard.forgive(self.client_address[0])

    # -- request → path guard → note ------------------------------------------

    def route(self):
        """Send the page, listing, search, raw text or file that the request asks for."""
        url_path, _, query = self.path.partition("#")[0].partition("?")
        if not url_path.startswith("/"):
            raise HTTPError(400, "The request target must be a path.")
        self.query = query_params(query)
        self.key = self.query.get("access_key")
        self.url_path = url_path
        if self.key is not None:
            wait, locked_now = self.server.guard.attempt(self.client_address[0])
            if locked_now:
                self.log_message("locked out for %d s after %d wrong keys", wait, GUESS_LIMIT)
            if wait:
                raise HTTPError(429, "Too many wrong keys from your address. Try again later.",
                                headers=[("Retry-After", str(wait))])
            self.guessing = True
        kind, real, status, note = self.resolve(url_path)
        if kind == "folder" and not url_path.endswith("/"):
            parts = [p for p in urllib.parse.unquote(url_path).split("/") if p not in ("", ".")]
            location = quote_url("/" + "/".join(parts) + "/")   # always one leading slash: never //host
            if query:
                location += "?" + urllib.parse.quote(query, safe="=&%+;/:,@!$'()*?")
            return self.send_body(b"", "text/html", status=301, headers=[("Location", location)])
        if self.key is not None and kind == "folder" and not self.server.index.opens_any(self.key):
            self.wrong_key()  # a listing or search would tell a key that opens something
        if kind == "folder":
            search = self.query.get("q", "")
            if len(search) >= MAX_QUERY_WORDS:
                raise HTTPError(400, "That search is too long.")
            return self.send_search(real, search.split()) if search.split() else self.send_listing(real)
        if kind == "note" and "raw" not in self.query:
            return self.send_note(real, note)
        return self.send_file(real)

    def resolve(self, url_path):
        """Return (kind, real path, stat, Note or None) for url_path, or raise HTTPError: 404 when it is
        not there or not to be served, 403 when it is a private note this request's key
        does not open.  A folder with a readable index.md or README.md means that note."""
        root = self.server.root
        kind, real, status = locate(root, url_path, self.server.forbidden, self.server.real_paths)
        if kind == "folder" and url_path.endswith("/") and not self.query.get("q", "").strip():
            for name in INDEX_NAMES:
                index = guarded(root, os.path.join(real, name), self.server.forbidden)
                try:
                    index_status = os.stat(index) if index else None
                except OSError:
                    continue
                if index_status and stat.S_ISREG(index_status.st_mode):
                    note = self.note(index, index_status)
                    if may_open(note.password, self.key):
                        return "note", index, index_status, note
                    break  # a private index: show the listing, which hides it
        note = self.note(real, status) if kind == "note" else None
        if note is not None and not may_open(note.password, self.key):
            self.refuse()
        return kind, real, status, note

    def note(self, real, status):
        """Return the Note at real (without its text), from the index when it is unchanged."""
        return self.server.index.entry(relative(self.server.root, real), real, status)[1]

    def refuse(self):
        """Answer 403 with a key form; the request's key, if any, stays counted as a wrong guess."""
        self.wrong_key()
        raise HTTPError(403, main=self.key_form(self.url_path, self.key is not None))

    def wrong_key(self):
        self.guessing = False  # the guess counted in route() stands

    # -- render → response ----------------------------------------------------

    def send_note(self, real, note):
        """Send a note's page, cached whole until the file changes."""
        server = self.server
        # A keyed page carries its key in its links: cached apart, under the key that opened
        # it (the note's own password), and only for private notes, so wrong keys cannot fill it.
        cache_key = ("page", self.url_path, note.mtime_ns, note.size, self.key)
        cacheable = self.key is None or note.password is not None
        etag = f'W/"{note.mtime_ns:x}-{note.size:x}-{server.salt}"'
        body = server.cache.get(cache_key) if cacheable else None
        if body is None:
            rel = relative(server.root, real)
            article = server.cache.get(("html", rel, note.mtime_ns, note.size))
            if article is None:
                fresh = note if note.text is not None else read_note(real, server.note_limit)
                if not may_open(fresh.password, self.key):  # made private since it was indexed
                    self.refuse()
                article = self.render_article(fresh, rel)
                server.cache.put(("html", rel, fresh.mtime_ns, fresh.size), article, len(article) * 2)
            cacheable = cacheable and "data-wiki=" not in article  # wiki targets change without this file
            article = WIKI_PLACEHOLDER.sub(lambda m: self.wiki_link(m, rel), article)
            folder = rel.rpartition("/")[0]
            body = self.page(f"{note.title} · {self.folder_name(folder)}", article + self.footer(note, rel),
                             folder, etag=etag)
            if cacheable:
                server.cache.put(cache_key, body, len(body))
        self.send_content(body, "text/html; charset=utf-8", etag, note.mtime_ns, note.password is not None,
                          gzip_key=cache_key + ("gzip",) if cacheable else None)

    def render_article(self, note, rel):
        """Return the article HTML of a note: contents, then the rendered markdown."""
        if note.too_large:
            quoted = html.escape(quote_url(rel.rpartition("/")[2]))
            return (f"<article><h1>{html.escape(note.title)}</h1><p>This note is {note.size / 2**20:.1f} MB, "
                    f"more than this server renders. <a href=\"{quoted}?raw\">Download it as text</a>.</p></article>")
        try:
            body, toc = render_markdown(note.text)
        except Exception:  # e.g. RecursionError on lists nested hundreds deep: show the text instead
            self.log_error("could not render %s; sent as text", rel)
            body, toc = f"<pre>{html.escape(note.text)}</pre>", ""
        return f"<article>{toc}{body}</article>"

    def footer(self, note, rel):
        """Return the small print under a note: its file, when it changed, its raw text."""
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(note.mtime_ns / 1e9))
        raw = html.escape(quote_url(rel.rpartition("/")[2]) + "?raw" + self.key_query().replace("?", "&"))
        return f'<p class="meta">{html.escape(rel)} · modified {modified} · <a href="{raw}">raw</a></p>'

    def wiki_link(self, match, rel):
        """Return the link for one [[wiki link]] placeholder, or broken text."""
        name, label = html.unescape(match.group(1)), match.group(2)
        target = self.server.index.find(name, rel.rpartition("/")[0])
        try:  # privacy as the target is now, not as last indexed
            kind, real, status = locate(self.server.root, quote_url("/" + (target or "")), self.server.forbidden)
            note = self.note(real, status) if kind == "note" else None
        except HTTPError:
            note = None
        if note is None or not may_open(note.password, self.key):
            return f'<span class="broken" title="No note named {html.escape(name)}">{label}</span>'
        key = self.key_query() if note.password is not None else ""
        return f'<a class="wikilink" href="/{html.escape(quote_url(target))}{key}">{label}</a>'

    def send_listing(self, real):
        """Send a folder's sub-folders and the notes this request may see, by title."""
        root, index = self.server.root, self.server.index
        folders, notes = [], []
        with os.scandir(real) as entries:
            entries = sorted(entries, key=lambda e: e.name.casefold())
        for entry in entries:
            target = guarded(root, entry.path, self.server.forbidden)
            try:
                status = os.stat(target) if target else None
                if status and stat.S_ISDIR(status.st_mode):
                    folders.append(entry.name)
                elif status and stat.S_ISREG(status.st_mode) and entry.name.lower().endswith(NOTE_SUFFIXES):
                    note = index.entry(relative(root, entry.path), target, status)[1]
                    if may_open(note.password, self.key):
                        notes.append((note.title.casefold(), entry.name, note))
            except OSError:  # vanished or unreadable since scandir: leave it out
                continue
        key = self.key_query()
        rows = [f'<li class="dir"><a href="../{key}">..</a></li>'] if real != root else []
        rows += [f'<li class="dir"><a href="{html.escape(quote_url(name))}/{key}">{html.escape(name)}/</a></li>'
                 for name in folders]
        for _, name, note in sorted(notes):
            lock = LOCK if note.password is not None else ""
            modified = time.strftime("%Y-%m-%d", time.localtime(note.mtime_ns / 1e9))
            rows.append(f'<li>{lock}<a href="{html.escape(quote_url(name))}{key if lock else ""}">'
                        f'{html.escape(note.title)}</a> <small>{html.escape(name)} · {modified}</small></li>')
        folder = relative(root, real)
        title = self.folder_name(folder)
        empty = "" if folders or notes else "<p>No notes here yet.</p>"
        main = f'<h1>{html.escape(title)}</h1><ul class="list">{"".join(rows)}</ul>{empty}'
        page_title = f"{title} · {self.folder_name('')}" if folder else title
        self.send_generated(self.page(page_title, main, folder))

    def send_search(self, real, words):
        """Send the notes under a folder holding every word, title matches first."""
        root, index = self.server.root, self.server.index
        folder, results = relative(root, real), []
        for rel in index.search(words, folder):
            indexed = index.entries.get(rel)
            if indexed is None or not may_open(indexed[1].password, self.key):
                continue
            try:  # re-read: privacy and snippet come from the file as it is now
                note = read_note(os.path.join(root, rel), self.server.note_limit)
            except OSError:
                continue
            if may_open(note.password, self.key):
                results.append((rel, note))
                if len(results) == SEARCH_RESULTS:
                    break
        key = self.key_query()
        rows = "".join(
            f'<li>{LOCK if note.password is not None else ""}<a href="/{html.escape(quote_url(rel))}'
            f'{key if note.password is not None else ""}">{highlight(note.title, words)}</a> '
            f'<small>{html.escape(rel)}</small><p>{snippet(note.text, words)}</p></li>'
            for rel, note in results)
        shown = " ".join(words)
        where = f" in {html.escape(self.folder_name(folder))}" if folder else ""
        count = len(results)
        more, plural = "+" if count == SEARCH_RESULTS else "", "s" if count > 1 else ""
        found = f"{count}{more} note{plural}" if count else "No notes"
        main = (f'<h1>Search: {html.escape(shown)}</h1><p class="meta-top">{found}{where}.</p>'
                f'<ol class="list">{rows}</ol>')
        self.send_generated(self.page(f"Search: {shown} · {self.folder_name(folder)}", main, folder, query=shown))

    def send_generated(self, body):
        """Send a listing or search page, with an ETag from its bytes so 304s work."""
        etag = 'W/"%s"' % hashlib.blake2b(body, digest_size=12).hexdigest()
        self.send_content(body, "text/html; charset=utf-8", etag, None, self.key is not None)

    def send_file(self, real):
        """Send a file as it is (a note's ?raw as text), less a password line it may start with."""
        content_type = "text/plain; charset=utf-8" if "raw" in self.query or real.lower().endswith(NOTE_SUFFIXES) \
            else (mimetypes.guess_type(real)[0] or "application/octet-stream")
        with open(real, "rb", buffering=0) as file:
            status, head = read_whole(file, SMALL_FILE)
            first = head.partition(b"\n")[0]
            password = password_of(first.decode("utf-8", "replace"))
            if not may_open(password, self.key):
                self.refuse()
            skip = len(first) + 1 if password is not None else 0
            length = status.st_size - skip
            etag = f'W/"{status.st_mtime_ns:x}-{status.st_size:x}-{self.server.salt}"'
            if status.st_size <= SMALL_FILE:  # read whole: a file truncated meanwhile still answers whole
                return self.send_content(head[skip:], content_type, etag, status.st_mtime_ns, password is not None,
                                         gzip_key=("gzip", real, status.st_mtime_ns, status.st_size, skip))
            headers = self.validators(etag, status.st_mtime_ns, password is not None)
            if self.not_modified(etag, status.st_mtime_ns):
                return self.send_body(b"", None, status=304, headers=headers)
            self.send_body(None, content_type, headers=headers + [("Content-Length", str(length))])
            if self.command == "GET":
                file.seek(skip)
                self.copy_exactly(file, length, status)

    def copy_exactly(self, file, length, status):
        """Stream length bytes of file; if it changes meanwhile, stop and close, so the client
        sees the download cut rather than the start of one version joined to another."""
        while length > 0:
            chunk = file.read(min(length, 256 * 1024))
            now = os.fstat(file.fileno())
            if not chunk or (now.st_mtime_ns, now.st_size) != (status.st_mtime_ns, status.st_size):
                self.close_connection = True
                return
            self.wfile.write(chunk)
            length -= len(chunk)

    # -- response helpers -----------------------------------------------------

    def send_content(self, body, content_type, etag, mtime_ns, private, gzip_key=None):
        """Send body with its validators: a 304 when the client's copy is current; gzipped
        (once, when gzip_key names it in the cache) for clients that take it, unless a key
        is involved: compressed secrets next to guessable text are a compression oracle."""
        headers = self.validators(etag, mtime_ns, private)
        if self.not_modified(etag, mtime_ns):
            return self.send_body(b"", None, status=304, headers=headers)
        if (self.key is None and not private and len(body) >= 1024 and is_text(content_type)
                and "gzip" in self.headers.get("accept-encoding", "")):
            zipped = self.server.cache.get(gzip_key) if gzip_key else None
            if zipped is None:
                zipped = gzip.compress(body, 6, mtime=0)
                if gzip_key:
                    self.server.cache.put(gzip_key, zipped, len(zipped))
            body, headers = zipped, headers + [("Vary", "Accept-Encoding"), ("Content-Encoding", "gzip")]
        self.send_body(body, content_type, headers=headers)

    def validators(self, etag, mtime_ns, private):
        """Return the cache headers: private answers are never stored anywhere."""
        headers = [("ETag", etag), ("Cache-Control", "no-store" if private else "no-cache")]
        if mtime_ns is not None:
            headers.append(("Last-Modified", http_date(mtime_ns // 10**9)))
        return headers

    def not_modified(self, etag, mtime_ns):
        """True when the client's copy is current (If-None-Match, else If-Modified-Since)."""
        tags = self.headers.get("if-none-match")
        if tags is not None:
            strip = lambda tag: tag.strip().removeprefix("W/")
            return tags.strip() == "*" or strip(etag) in map(strip, tags.split(","))
        since = self.headers.get("if-modified-since")
        if since is None or mtime_ns is None:
            return False
        try:
            return mtime_ns // 10**9 <= email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, OverflowError):
            return False

    def send_body(self, body, content_type, status=200, headers=()):
        """Send status, headers and body (no body for HEAD: the headers are the same as for GET).

        Builds the head in one string rather than through send_response/send_header: on
        the warm path those calls cost as much as everything else the server does."""
        self.log_request(status, len(body) if body else "-")
        head = [f"{self.protocol_version} {status} {self.responses[status][0]}\r\n"
                f"Server: {self.server_version}\r\nDate: {self.date_time_string()}\r\n"]
        if content_type:
            head.append(f"Content-Type: {content_type}\r\n")
        if body is not None and status != 304:
            head.append(f"Content-Length: {len(body)}\r\n")
        html_page = content_type is not None and content_type.startswith("text/html")
        head.append(self.server.security_headers[html_page])
        head.extend(f"{name}: {value}\r\n" for name, value in headers)
        if self.close_connection or self.server.stopping:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        head = "".join(head).encode("latin-1")
        if body and self.command != "HEAD":
            self.send_all(head, body)
        else:
            self.wfile.write(head)

    def send_all(self, head, body):
        """Send head and body in one system call (no Nagle wait, no copy of the body)."""
        if isinstance(self.connection, ssl.SSLSocket):  # TLS has no sendmsg
            return self.wfile.write(head + body)
        sent = self.connection.sendmsg([head, body])
        if sent < len(head) + len(body):
            self.connection.sendall(memoryview(head + body)[sent:])

    def send_error(self, code, message=None, explain=None, main=None, headers=()):
        """Send a short error page from the one template.  Replaces http.server's, whose
        message may echo the request line, and with it a key."""
        status = HTTPStatus(code)
        if code >= 500 or code in (400, 413, 414, 431):
            self.close_connection = True
        if code in (405, 501):
            headers = list(headers) + [("Allow", "GET, HEAD")]
        if main is None:
            main = f"<h1>{code} {html.escape(status.phrase)}</h1><p>{html.escape(explain or status.description)}.</p>"
        body = self.page(f"{code} {status.phrase}", main, "", chrome=False)
        self.send_body(body, "text/html; charset=utf-8", status=code,
                       headers=[("Cache-Control", "no-store")] + list(headers))

    def key_form(self, url_path, tried):
        """Return the body of the 403 page of a private note: a form asking for its key."""
        wrong = "<p>That key does not open this note.</p>" if tried else ""
        return (f"<h1>This note is private</h1>{wrong}<form class=\"key\" method=\"get\" "
                f"action=\"{html.escape(quote_url(urllib.parse.unquote(url_path)))}\">"
                f"<label>Key <input type=\"password\" name=\"access_key\" autofocus></label> "
                f"<button>Open</button></form>")

    def key_query(self):
        """Return '?access_key=…' to carry this request's key on links, or ''."""
        return "?" + urllib.parse.urlencode({"access_key": self.key}) if self.key is not None else ""

    def folder_name(self, folder):
        return folder.rpartition("/")[2] or os.path.basename(self.server.root) or "/"

    def page(self, title, main, folder, query="", etag=None, chrome=True):
        """Return the whole HTML page for main, with header, title and reload script."""
        key = self.key_query() if chrome else ""
        crumbs = breadcrumbs(self.folder_name(""), getattr(self, "url_path", "/"), key) if chrome else \
            f'<a href="/">{html.escape(self.folder_name(""))}</a>'
        key_field = f'<input type="hidden" name="access_key" value="{html.escape(self.key)}">' if key else ""
        script = (f'<script data-etag="{html.escape(etag)}">{RELOAD_SCRIPT}</script>'
                  if etag and self.server.reload else "")
        css = CSS + (CODE_CSS if 'class="highlight"' in main else "")
        search_url = quote_url("/" + folder + "/" if folder else "/")
        return PAGE.format(title=html.escape(title), favicon=FAVICON, css=css, crumbs=crumbs,
                           search_url=html.escape(search_url), key_field=key_field, query=html.escape(query),
                           folder=html.escape(self.folder_name(folder)), main=main, script=script).encode()

    def parse_request(self):
        """Parse the request line and headers into self.headers, a dict of lower-case names.

        Replaces http.server's, whose email-package header parser is the largest cost of a
        warm request; also refuses HTTP/0.9 and 2.x instead of half-answering them."""
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not HTTP_VERSION.fullmatch(words[-1]):
            return self.send_error(400, explain="Bad request line")
        self.command, self.path, self.request_version = words
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            return self.send_error(505)
        self.headers = {}
        for _ in range(101):
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(line) > MAX_HEADER_BYTES:
                return self.send_error(431)
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if not colon or not name or name != name.strip():
                return self.send_error(400, explain="Bad header line")
            self.headers[name.lower()] = value.strip()
        else:
            return self.send_error(431)
        connection = self.headers.get("connection", "").lower()
        self.close_connection = "close" in connection or (words[2] == "HTTP/1.0" and "keep-alive" not in connection)
        return True

    def date_time_string(self, timestamp=None):
        return now_strings()[0] if timestamp is None else super().date_time_string(timestamp)

    def log_date_time_string(self):
        return now_strings()[1]

    def log_message(self, format, *args):
        """Log one line, the key redacted and control characters escaped."""
        message = redact(format % args)
        if not message.isprintable():
            message = message.translate(CONTROL_CHARS)
        self.server.log_line(f"{self.address_string()} - - [{self.log_date_time_string()}] {message}\n")


@functools.lru_cache(maxsize=4096)
def http_date(seconds):
    return email.utils.formatdate(seconds, usegmt=True)


_now = [0, "", ""]


def now_strings():
    """Return (HTTP date, log date) for this second, formatted once a second."""
    seconds = int(time.time())
    if _now[0] != seconds:
        _now[:] = [seconds, email.utils.formatdate(seconds, usegmt=True), time.strftime("%d/%b/%Y %H:%M:%S")]
    return _now[1], _now[2]


def query_params(query):
    """Return {name: first value} of a query string; 400 for more than 32 parameters."""
    params = {}
    if query:
        pairs = query.split("&")
        if len(pairs) > 32:
            raise HTTPError(400, "Too many query parameters.")
        for pair in pairs:
            name, _, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name, value = urllib.parse.unquote_plus(name), urllib.parse.unquote_plus(value)
            params.setdefault(name, value)
    return params


def redact(text):
    """Return text with the value of every access_key parameter replaced by ***."""
    start = text.find("access_key=")
    while start >= 0:  # the usual spelling, found cheaply: it is on every keyed request
        value = start + len("access_key=")
        end = VALUE_END.search(text, value)
        text = text[:value] + "***" + (text[end.start():] if end else "")
        start = text.find("access_key=", value + 3)
    if "%" not in text:  # no parameter name can be spelled another way
        return text

    def hide(match):
        name = match.group(2)
        if name != "access_key" and ("%" in name or "+" in name):
            name = urllib.parse.unquote_plus(name)
        return match.group(0) if name != "access_key" else f"{match.group(1)}{match.group(2)}=***"
    return KEY_IN_LOG.sub(hide, text)


def is_text(content_type):
    return content_type.startswith("text/") or content_type.endswith(("json", "javascript", "xml"))


# Server ######################################################################

class NoteServer(ThreadingHTTPServer):
    """A threading HTTP server holding the settings, caches and index of one notes folder."""

    daemon_threads = True
    request_queue_size = 128
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n"
            b"Retry-After: 5\r\nConnection: close\r\n\r\nServer busy, retry.\n")

    def __init__(self, address, root, reload=True, cache_mb=64, max_note_mb=10, tls=None,
                 max_connections=256, client_timeout=10.0, log=None, clock=time.monotonic):
        self.root = os.path.realpath(root)
        self.forbidden = {os.path.realpath(__file__)} | {os.path.realpath(p) for p in (tls or ())}
        self.reload, self.note_limit, self.client_timeout = reload, int(max_note_mb * 2**20), client_timeout
        self.max_connections, self.connections, self.stopping = max_connections, 0, False
        self.log, self.log_lines, self.log_lock = log or sys.stderr, collections.deque(maxlen=100000), threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self.write_log, daemon=True).start()
        script = f"'{RELOAD_HASH}'" if reload else "'none'"
        common = "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
        csp = f"Content-Security-Policy: {CSP.format(script=script)}\r\n"
        self.security_headers = {False: common, True: common + csp}   # by: is it an HTML page?
        self.cache = LRUCache(int(cache_mb * 2**20))
        self.real_paths = {}
        self.index = NoteIndex(self.root, self.note_limit, self.forbidden)
        self.guard = KeyGuard(clock)
        self.in_flight, self.count_lock = set(), threading.Lock()
        self.salt = hashlib.blake2b(f"{__version__}{reload}{time.time_ns()}".encode(), digest_size=3).hexdigest()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, NoteHandler)
        if tls:  # the handshake happens in the connection's own thread, under its timeout
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self):
        # http.server's calls getfqdn(), a DNS look-up that can stall start-up and leave the machine.
        super(ThreadingHTTPServer, self).server_bind()
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self.count_lock:
            busy = self.connections >= self.max_connections
            self.connections += not busy
        if not busy:
            try:
                return super().process_request(request, client_address)
            except RuntimeError:  # no thread to be had: refuse like a full server
                with self.count_lock:
                    self.connections -= 1
        try:  # refuse cleanly, without a thread and without waiting on the client
            request.setblocking(False)
            if not isinstance(request, ssl.SSLSocket):
                request.send(self.BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.connections -= 1

    def handle_error(self, request, client_address):
        # One line instead of a traceback; a vanished client is not worth a line.
        error = sys.exc_info()[1]
        if not isinstance(error, (OSError, ValueError)):
            self.log_line(f"mdserve: error answering {client_address[0]}: {type(error).__name__}\n")

    def log_line(self, line):
        # Kept, then written by a thread of its own: a write per request would hand the GIL
        # to another thread and back (the costliest thing a warm request can do), and a log
        # nobody reads (a full pipe) must not stop anything but the log.
        self.log_lines.append(line)

    def write_log(self):
        while not self.closed.wait(0.2):
            self.flush_log()

    def flush_log(self):
        with self.log_lock:
            lines = []
            while self.log_lines:
                lines.append(self.log_lines.popleft())
            try:
                if lines:
                    self.log.write("".join(lines))
                    self.log.flush()
            except (OSError, ValueError):  # the log's reader is gone: lose the lines, not the server
                pass

    def server_close(self):
        super().server_close()
        self.closed.set()

    def stop(self, grace=5.0):
        """Stop accepting, give requests in flight up to grace seconds, then close."""
        self.stopping = True
        self.server_close()
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.flush_log()


def make_server(root, host="127.0.0.1", port=0, **settings):
    """Return a NoteServer for root bound to (host, port); port 0 picks a free one."""
    return NoteServer((host, port), root, **settings)


# Command line ################################################################

def lan_address():
    """Return this machine's address on its local network, or None.

    Connecting a UDP socket only chooses a route: no packet is sent to anyone.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith(("127.", "0.")) else address


def banner(server, host, scheme):
    """Return the start-up lines: folder, URLs to open, how to stop."""
    port = server.server_address[1]
    url = lambda h: f"{scheme}://{'[' + h + ']' if ':' in h else h}:{port}/"
    lines = [f"mdserve {__version__}: serving {server.root}",
             f"  on this machine:  {url('127.0.0.1' if host in ('', '0.0.0.0') else '::1' if host == '::' else host)}"]
    if host in ("", "0.0.0.0", "::"):
        address = lan_address()
        lines.append(f"  on your network:  {url(address) if address else '(no network address found)'}")
    return lines


def count_notes(server, out):
    """Index every note, then print how many are public and private (never a key)."""
    server.index.refresh()
    public, private, locked = server.index.counts()
    print(f"  notes: {public} public, {private} private", file=out, flush=True)
    for rel in locked:
        print(f"  warning: {rel} has an empty password: it is locked for everyone", file=out, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage plus a message
        self.exit(2, f"mdserve: {message}\n")


def main(argv=None):
    parser = _Parser(prog="mdserve", description="Serve a folder of markdown notes as a small website.")
    parser.add_argument("folder", nargs="?", default=".", metavar="DIR", help="folder of notes (default: .)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("-b", "--bind", default="0.0.0.0", metavar="ADDRESS",
                        help="address to listen on (default: all interfaces; 127.0.0.1 keeps it to this machine)")
    parser.add_argument("--no-reload", action="store_true", help="do not reload open pages when their note changes")
    parser.add_argument("--cache-mb", type=float, default=64, metavar="MB",
                        help="memory for rendered pages, in MB (default: 64)")
    parser.add_argument("--max-note-mb", type=float, default=10, metavar="MB",
                        help="larger notes are offered as raw text instead of rendered (default: 10)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--max-connections", type=int, default=256, metavar="N",
                        help="open connections at once (default: 256)")
    parser.add_argument("--timeout", type=float, default=10, metavar="SECONDS",
                        help="seconds a client may be idle or take to send a request (default: 10)")
    parser.add_argument("--version", action="version", version=f"mdserve {__version__}")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        parser.error(f"{args.folder}: not a folder")
    args.bind = {"localhost": "127.0.0.1", "": "0.0.0.0"}.get(args.bind, args.bind)
    try:
        ipaddress.ip_address(args.bind)
    except ValueError:
        parser.error(f"--bind {args.bind}: not an IP address (try 127.0.0.1 or 0.0.0.0)")
    if not 0 <= args.port <= 65535:
        parser.error(f"port {args.port} is not between 0 and 65535")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if min(args.cache_mb, args.max_note_mb, args.timeout) <= 0 or args.max_connections < 1:
        parser.error("--cache-mb, --max-note-mb, --timeout and --max-connections must be positive")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        server = make_server(args.folder, args.bind, args.port, reload=not args.no_reload,
                             cache_mb=args.cache_mb, max_note_mb=args.max_note_mb, tls=tls,
                             max_connections=args.max_connections, client_timeout=args.timeout)
    except ssl.SSLError as error:
        parser.error(f"cannot use the TLS certificate or key: {error.reason or error}")
    except OSError as error:
        parser.error(f"cannot listen on {args.bind}:{args.port}: {error.strerror or error}")
    for line in banner(server, args.bind, "https" if tls else "http"):
        print(line, flush=True)
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
    try:
        counter = threading.Thread(target=count_notes, args=(server, sys.stdout), daemon=True)
        counter.start()
        counter.join(0.25)  # small folders get their counts in the banner; big ones a moment later
        print("  Ctrl+C to stop", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.stop()
    print("mdserve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
