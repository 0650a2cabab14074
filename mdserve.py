#!/usr/bin/env python3
# /// script
# requires-python = ">=3.8"
# dependencies = ["markdown>=3.3"]
# ///
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

__version__ = "1.1"
__all__ = ["NoteServer", "NoteHandler", "make_server", "main"]

import argparse
import base64
import collections
import contextlib
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
import posixpath
import queue
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import xml.etree.ElementTree as etree
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import markdown
except ImportError:  # --help and --version still work; serving says what to install (see main)
    markdown = None
try:
    from markdown.blockprocessors import HashHeaderProcessor
    from markdown.extensions import Extension
    from markdown.inlinepatterns import InlineProcessor, SubstituteTagInlineProcessor
    from markdown.postprocessors import Postprocessor
    from markdown.preprocessors import Preprocessor
    from markdown.treeprocessors import Treeprocessor
    from markdown.util import AtomicString, HTML_PLACEHOLDER_RE, STX, ETX
except ImportError:  # no markdown, or one too old: main() says so before anything is built on these
    HashHeaderProcessor = Extension = InlineProcessor = Postprocessor = Preprocessor = Treeprocessor = object
    SubstituteTagInlineProcessor = AtomicString = HTML_PLACEHOLDER_RE = STX = ETX = None

try:  # Pygments is optional: code blocks are styled either way, coloured when it is there.
    from pygments import highlight as pygments_highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound
except ImportError:
    HtmlFormatter = None


# Constants and template ######################################################

MIN_MARKDOWN = (3, 3)           # the oldest Python-Markdown tested (CI runs against it)
NOTE_SUFFIXES = (".md", ".markdown")
INDEX_NAMES = ("index.md", "index.markdown")     # a folder with one of these shows that note alone
README_NAMES = ("readme.md", "readme.markdown")  # any case: shown under the folder's listing, as GitHub does
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32 * 1024
MAX_QUERY_WORDS = 1000          # characters in ?q=
SEARCH_RESULTS = 50
SEARCH_TERMS = 10               # distinct words a search uses; the rest are ignored
MIN_PREFIX = 3                  # shorter words match whole words only: "a*" would match nearly everything
SEARCH_SECONDS = 1.0            # a search stops after this long and says so
SCAN_SECONDS = 5.0              # the same for the file scan of a Python without FTS5
RANK_LIMIT = 2000               # past this many matches, results are not ranked (ranking scores each one)
INDEX_PAUSE, LONGEST_INDEX_PAUSE = 0.5, 2.0   # seconds between two walks of the indexer: at least, at most
RENDER_SECONDS = 5.0            # a note that takes longer to render is shown as text
SMALL_FILE = 1024 * 1024        # static files up to this size are read whole (and may be gzipped)
GUESS_LIMIT, GUESS_WINDOW, FIRST_LOCKOUT, LONGEST_LOCKOUT = 10, 60.0, 60.0, 900.0
QUIET_PERIOD = 1800.0           # each half hour without a lock-out halves the next one
LOCKOUT_STEPS = 1 + math.ceil(math.log2(LONGEST_LOCKOUT / FIRST_LOCKOUT))   # doublings to the longest
KNOWN_METHODS = {"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
PASSWORD_LINE = re.compile(r"password:(.*)", re.IGNORECASE)
REFUSED_PATH = re.compile(r"(^|/)\.(?!/|$)|[\\\0]")   # a dot-name, '..', a backslash or a NUL
HTTP_VERSION = re.compile(r"HTTP/\d\.\d")
# Where a key ends in a log line: at the next parameter, as query_params splits (a ';' is part
# of a key), or at the end of the request line, even one a space inside the key made bad.
VALUE_END = re.compile(r'&|\s+HTTP/\d|"(?=\s\d{3}\s)')
KEY_IN_LOG = re.compile(r"([?&;])([^=&;\s]*)=([^&\s]*)")
# [[target#anchor|label]]; in a table the bar is written \| (Obsidian's rule), so a '\' before it is no name's
WIKI_LINK = r"(?<!\\)(!?)\[\[([^\[\]|\n]*?)\\?(?:\|([^\[\]\n]*))?\]\]"  # no [ inside: linear on "[[[[…"
PATH_PLACEHOLDER = re.compile(r'<(a|img)((?: [\w-]+="[^"]*")*?) data-path=""((?: [\w-]+="[^"]*")*?) '
                              r'(href|src)="([^"]*)"')  # see VaultPaths
WIKI_PLACEHOLDER = re.compile(r'(<p>)?<a ((?:data-(?:embed|text|wiki)="[^"]*" ?)+)>(.*?)</a>(</p>)?', re.S)
TAG = r"#(?<![^\s(\[]#)([\w][\w/-]*)"  # '#' first: the regex engine then skips to each '#' at once
CONTROL_CHARS = str.maketrans({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))})

# Polls its own URL (key included) with the ETag it was served with; reloads when that changes.
# The poll runs in <head>, before the note is parsed: there no <img name="currentScript"> in a
# note can stand in for document.currentScript (DOM clobbering) and make it reload forever.
RELOAD_SCRIPT = (  # a 429 (a wrong key, locked out) stops it: polling on would only prolong the lock-out
    "(function(){var t=document.currentScript.dataset.etag,i=setInterval(function(){"
    "fetch(location.href,{method:'HEAD',cache:'no-store',headers:{'If-None-Match':t}})"
    ".then(function(r){if(r.status==429)clearInterval(i);"
    "else if(r.status==200||r.status==403||r.status==404)location.reload()},function(){})},1000)})();")
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

# "main svg{overflow:hidden}" beats a note's overflow="visible": no drawing spills over the page.
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
main svg{overflow:hidden!important}
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
.task-list-item{list-style:none}.task-list-item>input,.task-list-item>p>input{margin:0 .45em .15em -1.35em;vertical-align:middle}
.callout{--c:9,105,218;border-left:4px solid rgb(var(--c));background:rgba(var(--c),.09);border-radius:6px;
padding:.3rem 1rem;margin:1em 0}.callout>:last-child{margin-bottom:.5rem}
.callout-title{display:flex;gap:.45rem;align-items:center;font-weight:600;color:rgb(var(--c));margin:.35rem 0}
summary.callout-title{cursor:pointer}.callout-icon{flex:none;fill:none;stroke:currentColor;stroke-width:2;
stroke-linecap:round;stroke-linejoin:round}
.callout-blue{--c:9,105,218}.callout-cyan{--c:0,138,138}.callout-green{--c:26,127,55}.callout-purple{--c:130,80,223}
.callout-orange{--c:176,98,0}.callout-red{--c:207,34,46}.callout-gray{--c:101,109,118}
@media (prefers-color-scheme:dark){.callout-blue{--c:88,166,255}.callout-cyan{--c:57,197,207}
.callout-green{--c:63,185,80}.callout-purple{--c:171,125,248}.callout-orange{--c:219,155,48}
.callout-red{--c:248,81,73}.callout-gray{--c:145,152,161}}
del{color:var(--muted)}div.math{white-space:pre-wrap;overflow-x:auto;margin:1em 0}
.readme{margin-top:2rem;border-top:1px solid var(--line)}
.embed{border-left:3px solid var(--line);padding:0 0 0 1rem;margin:1em 0}.embed-title{font-size:.85rem;margin:.3rem 0}
a.tag{background:var(--soft);border:1px solid var(--line);border-radius:1em;padding:0 .45em;font-size:.88em}
.tags{margin:-.3rem 0 1rem}.attachment:before{content:"\1F4CE  "}
.backlinks{margin-top:2.5rem;font-size:.92rem}.backlinks h2{font-size:1rem;border:0;color:var(--muted);margin:0}
.backlinks ul{margin:.3rem 0;padding-left:1.2rem}
.contents{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:.4rem 1rem;
margin:1rem 0;font-size:.92rem}.contents ul{margin:.2rem 0;padding-left:1.1rem}.contents summary{cursor:pointer}
.list{list-style:none;padding:0}.list li{padding:.5rem 0;border-bottom:1px solid var(--line)}
.list small,.meta{color:var(--muted);font-size:.8rem}.list p{margin:.2rem 0 0;font-size:.92rem}
.list .dir a{font-weight:600}.lock{vertical-align:-2px;margin-right:.25rem;color:var(--muted)}
.broken{color:var(--bad);text-decoration:underline dotted;cursor:help}
.meta{margin-top:3rem;border-top:1px solid var(--line);padding-top:.6rem}
form.key input,form.key button{font:inherit;padding:.3rem .7rem;margin-right:.4rem;border:1px solid var(--line);
border-radius:6px;background:var(--bg);color:var(--fg)}form.key button{background:var(--link);color:#fff;border:0}
@media print{header,.meta,.headerlink,.contents,.backlinks{display:none}body{font-size:11pt;background:#fff;color:#000}
main{max-width:none;padding:0}pre,table{overflow:visible}a{color:inherit}}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title><link rel="icon" href="{favicon}"><style>{css}</style>{script}</head>
<body><header><nav class="crumbs">{crumbs}</nav>
<form role="search" action="{search_url}" method="get">{key_field}<input type="search" name="q"
 value="{query}" placeholder="Search {folder}" aria-label="Search"></form></header>
<main>{main}</main>
</body></html>
"""

if HtmlFormatter:
    CODE_FORMATTER = HtmlFormatter(cssclass="highlight", wrapcode=True)
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


# Platform ####################################################################

class Platform:
    """What this operating system offers, chosen once, at start-up, by capability.

    MDSERVE_PLATFORM=win32 makes the same choices on any system, which is how the tests
    stand in for Windows: each fallback then runs over real sockets.
    """

    def __init__(self, name):
        windows = name == "win32"
        self.name = name
        # One sendmsg() sends head and body without joining them; Windows has no sendmsg.
        self.sendmsg = hasattr(socket.socket, "sendmsg") and not windows
        # The kernel's idle timeouts (SO_RCVTIMEO/SO_SNDTIMEO, a struct timeval) spare a poll()
        # before every recv and send.  Windows reads those options as a DWORD of milliseconds:
        # there Python's own socket timeout is used, whose units CPython gets right everywhere.
        self.kernel_timeouts = not windows and hasattr(socket, "SO_RCVTIMEO")
        # On Windows SO_REUSEADDR lets a second server take a port that is in use; bind exclusively.
        self.exclusive_bind = windows
        # Junctions and other reparse points lead elsewhere, like symlinks.
        self.reparse_points = getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0x400) if windows else 0


PLATFORM = Platform(os.environ.get("MDSERVE_PLATFORM") or sys.platform)


# Notes #######################################################################

class Note:
    """A note's text less its password line, with what listings need to know of it: its
    front matter's aliases and tags, and its row in the text index (0 while this version
    is not indexed)."""
    __slots__ = ("title", "password", "text", "mtime_ns", "size", "too_large", "row", "racy", "aliases", "tags")

    def __init__(self, title, password, text, mtime_ns, size, too_large=False, row=0, aliases=(), tags=()):
        self.title, self.password, self.text = title, password, text
        self.mtime_ns, self.size, self.too_large, self.row, self.racy = mtime_ns, size, too_large, row, False
        self.aliases, self.tags = aliases, tags


def password_of(first_line):
    """Return the password a note's first line sets, or None for a public note."""
    match = PASSWORD_LINE.fullmatch(first_line.lstrip("\ufeff").strip())
    return match.group(1).strip() if match else None


def split_front_matter(text):
    """Return (text without a leading YAML front matter block, {field: value}) for the fields
    mdserve reads: title, and aliases and tags as lists (inline, comma-separated or one item
    a line; Obsidian's older 'alias' and 'tag' too)."""
    if not text.startswith("---\n"):
        return text, {}
    end = re.search(r"^(?:---|\.\.\.)[ \t]*$", text[4:], re.M)
    if not end or text[4:4 + end.start()].count("\n") > 200:
        return text, {}
    fields, key = {}, None
    for line in text[4:4 + end.start()].split("\n"):
        item = re.match(r"[ \t]*-[ \t]+(.+)", line)
        if item and key in ("aliases", "tags"):
            fields[key].append(unquoted(item.group(1)))
            continue
        pair = re.match(r"([A-Za-z_][\w-]*):[ \t]*(.*)", line)
        key = {"alias": "aliases", "tag": "tags"}.get(pair.group(1).lower(), pair.group(1).lower()) if pair else None
        if key in ("aliases", "tags"):
            value = pair.group(2).strip().strip("[]")
            items = value.replace(",", " ").split() if key == "tags" else value.split(",")  # tags have no spaces
            fields.setdefault(key, []).extend(unquoted(v) for v in items if v.strip())
        elif key == "title" and pair.group(2).strip():
            fields["title"] = unquoted(pair.group(2))
    if "tags" in fields:
        fields["tags"] = [t.lstrip("#") for tag in fields["tags"] for t in tag.split() if t.lstrip("#")]
    return text[4 + end.end():].lstrip("\n"), fields


def heading_text(text):
    """Return an ATX heading's text without its closing #s (string work: no regex to backtrack)."""
    text = text.strip()
    bare = text.rstrip("#")
    return bare.rstrip() if bare != text and (not bare or bare[-1] in " \t") else text


def unquoted(value):
    value = value.strip()
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value


PLAIN_TEXT = (  # markdown markup and what it stands for in plain text, in this order
    (re.compile(r"%%(?:(?!%%).)*%%|<!--(?:(?!<!--).)*?-->", re.S), " "),     # comments (each scan stops at the next)
    (re.compile(r"^[ \t]*(?:`{3,}|~{3,}).*$", re.M), " "),                   # code fences
    (re.compile(r"!?\[\[([^\[\]|\n]*?)(?:\\?\|([^\[\]\n]*))?\]\]"), lambda m: m.group(2) or m.group(1)),  # wiki links
    (re.compile(r"!?\[([^\[\]\n]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+\"[^\"]*\")?\)"), r"\1"),  # links, images
    (re.compile(r"\[([^\[\]\n]*)\]\[[^\[\]\n]*\]"), r"\1"),                        # reference links
    (re.compile(r"</?[A-Za-z][^<>\n]{0,2000}>"), " "),                       # tags
    (re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|(?:>[ \t]?)+(?:\[![\w-]+\][+-]?[ \t]*)?|[-*+][ \t]+(?:\[[ xX]\][ \t]+)?"
                r"|\d+[.)][ \t]+|\[\^[^\]]+\]:[ \t]*)", re.M), ""),           # block markers
    (re.compile(r"^[ \t]*(?:\|[ \t]*)?:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$", re.M), " "),  # table rules
    (re.compile(r"\{[#.:][^{}\n]{0,500}\}|[ \t]\^[A-Za-z0-9-]+$", re.M), ""),  # attribute lists, block ids
    (re.compile(r"(?<![*_~=`])(\*{1,3}|_{1,3}|~~|==|`+)(?![*_~=`\s])(.{0,2000}?\S)\1"), r"\2"),  # emphasis,
    # struck, marked, code: from a run's start, with a bounded reach, so linear on "****…"
    (re.compile(r"[|]"), " "),                                                # table cells
)


def plain_text(markdown_text):
    """Return markdown as the text a reader sees: links as their text, no markup."""
    for pattern, replacement in PLAIN_TEXT:
        markdown_text = pattern.sub(replacement, markdown_text)
    return html.unescape(markdown_text)


def first_heading(text):
    """Return the plain text of the first level-1 heading outside code blocks, or None: a
    note's title (its first '## Section' is not; that is how GitHub and Obsidian see it)."""
    previous = ""
    for line in outside_fences(text.split("\n", 400)[:400]):
        stripped = line.strip()
        if line.startswith("    "):
            previous = ""
            continue
        if stripped.startswith(("# ", "#\t")):
            return plain_text(heading_text(stripped[1:])).strip() or None
        if previous and re.fullmatch(r"=+", stripped):
            return plain_text(previous).strip() or None
        previous = stripped if stripped and not re.match(r"[-*+>#|]|\d+[.)]", stripped) else ""
    return None


def outside_fences(lines):
    """Yield the lines, each line of a fenced code block (fences included) as an empty one."""
    fence = None
    for line in lines:
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, line = stripped[:3], ""
        elif fence is not None:
            fence, line = (None if stripped.startswith(fence) and not stripped.strip().strip(fence[0]) else fence), ""
        yield line


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
    body, fields = split_front_matter(text if password is None else rest)
    name = readable(os.path.splitext(os.path.basename(path))[0])
    return Note(fields.get("title") or first_heading(body) or name, password, body,
                status.st_mtime_ns, status.st_size, status.st_size > limit,
                aliases=tuple(fields.get("aliases", ())), tags=tuple(fields.get("tags", ())))


def racy(mtime_ns):
    """True when a file may still change without its mtime changing ("racy git"): it was
    changed less than one tick of its file system's clock ago.  A whole-second mtime shows
    a coarse clock (FAT: 2 s, HFS+ and ext3: 1 s); finer ones tick at least every 20 ms."""
    tick = 2 * 10**9 if mtime_ns % (2 * 10**9) == 0 else 10**9 if mtime_ns % 10**9 == 0 else 2 * 10**7
    return time.time_ns() - mtime_ns < tick


def password_in(path):
    """Return the password a note's first line sets (None: public, or unreadable: not shown)."""
    try:
        with open(path, "rb") as file:
            first = file.read(4096).partition(b"\n")[0]
    except OSError:
        return ""  # locked for everyone: what cannot be read cannot be shown to be public
    return password_of(first.decode("utf-8", "replace"))


def may_open(password, key):
    """True when key opens a note with this password (None: public; empty: locked for all)."""
    if password is None:
        return True
    return bool(password) and key is not None and hmac.compare_digest(key.encode(), password.encode())


# Path guard ##################################################################

def guarded(root, path):
    """Return the real path of path when it lies inside root and outside dot-folders, else None.

    Links (symlinks, and on Windows junctions: realpath resolves both) are resolved
    first, so a link that leads out of the folder or into a dot-folder is refused like
    the place it leads to.
    """
    real = os.path.realpath(path)
    if real == root:
        return real
    if not real.startswith(os.path.join(root, "")):
        return None
    if any(part.startswith(".") for part in relative(root, real).split("/")):
        return None
    return real


def is_forbidden(status, forbidden):
    """True for the server's own script and TLS files, compared by identity (device and
    inode), never by spelling: on a case-insensitive file system /MDSERVE.PY is the script."""
    return (status.st_dev, status.st_ino) in forbidden


def inspect(root, path, forbidden):
    """Return (real path, stat) of path when it may be served, else (None, None); OSError
    when it vanished."""
    real = guarded(root, path)
    status = os.stat(real) if real else None
    if status is None or is_forbidden(status, forbidden):
        return None, None
    return real, status


def locate(root, url_path, forbidden=frozenset(), known=None):
    """Return (kind, real path, stat) that a URL path means: kind is note, folder or file.

    Raises HTTPError 404 for anything that is not there or must look as if it were not:
    dot-names, '..', backslashes, NULs, paths outside root, fifos and devices.  known, a
    dict, remembers real paths already checked, trusted again only while the path still
    leads to the same inode: one stat instead of an lstat per folder on the way.
    """
    # surrogateescape: a name that is not UTF-8 (possible on Linux) is reached by its bytes
    decoded = urllib.parse.unquote(url_path, errors="surrogateescape")
    if REFUSED_PATH.search(decoded):
        raise HTTPError(404)
    path = os.path.join(root, *[p for p in decoded.split("/") if p not in ("", ".")])
    candidates = [path] if url_path.endswith("/") else [path, path + ".md", path + ".markdown"]
    known = {} if known is None else known
    for candidate in candidates:
        try:
            status = os.stat(candidate)
        except (OSError, ValueError):  # ValueError: a name this platform cannot spell
            continue
        if is_forbidden(status, forbidden):
            break
        real, device, inode = known.get(candidate, (None, None, None))
        if (device, inode) != (status.st_dev, status.st_ino):
            real = guarded(root, candidate)
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


def is_link(entry):
    """True for a directory entry that leads elsewhere: a symlink, or on Windows a junction
    or other reparse point (which is_symlink() does not report before Python 3.12)."""
    if entry.is_symlink():
        return True
    return bool(PLATFORM.reparse_points and PLATFORM.reparse_points
                & getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0))


def note_files(root, folder, forbidden=frozenset(), others=None):
    """Yield (relative path, real path, stat) for each note under folder; when others is a
    list, add the relative paths of the other files to it (attachments, for wiki links).

    Iterative, so very deep trees cannot exhaust the stack; linked folders are not
    entered, so link loops cannot trap it, and linked notes count only when they lead to a
    note inside the folder.  Names that are not UTF-8 are walked too: they are counted (a
    folder of private notes stays hidden whatever its names), though not searchable.
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
                linked = is_link(entry)
                if entry.is_dir(follow_symlinks=False) and not linked:
                    stack.append(entry.path)
                elif entry.name.lower().endswith(NOTE_SUFFIXES):
                    real, status = inspect(root, entry.path, forbidden) if linked else (entry.path, entry.stat())
                    if status and stat.S_ISREG(status.st_mode) and not is_forbidden(status, forbidden):
                        yield relative(root, entry.path), real, status
                elif others is not None and not linked:
                    others.append(relative(root, entry.path))
            except OSError:
                continue


def is_utf8(name):
    """False for a file name that is not valid UTF-8 (os functions hand it over with surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# Markdown dialect ############################################################
#
# Python-Markdown reads its own dialect; the notes were written for GitHub (CommonMark and
# its GFM extensions) or Obsidian.  Each construct below is a small Python-Markdown
# extension: the block structure is rewritten first, line by line, into the form
# Python-Markdown reads (GitHubBlocks), and the rest are inline patterns and tree
# processors.

# Tags GitHub shows as text rather than run (its "tagfilter"), and a few more that a page of
# notes has no use for: they could run script, restyle or redirect the page, or post a form.
REFUSED_TAGS = ("script", "style", "iframe", "object", "embed", "base", "meta", "link", "form", "frame",
                "frameset", "noscript", "title", "textarea", "xmp", "noembed", "noframes", "plaintext",
                "html", "head", "body", "main", "article",      # the page's own frame: a stray </main> would end it
                "animate", "animatemotion", "animatetransform", "set")  # SVG's way to change an href later
REFUSED_TAG = re.compile(r"<(/?(?:%s))(?=[\s/>]|$)" % "|".join(REFUSED_TAGS), re.I)
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)[^\n]{0,2000}?(?<!`)\1(?!`)")  # a run's start only, a bounded reach:
# linear on a line of backticks (one regex call is one C call: no watchdog can stop it midway)
# Attributes that could run script, load a document into the page, or send the key away in
# a Referer (referrerpolicy overrides the page's no-referrer).  Any attribute whose value is
# a script URL goes too: SVG animations set an href from "values", "to" or "from".
REFUSED_ATTRIBUTES = {"srcdoc", "formaction", "referrerpolicy", "ping", "http-equiv",
                      "popover", "popovertarget", "popovertargetaction"}  # a popover shows above the page
OUR_ATTRIBUTES = {"data-wiki", "data-embed", "data-text", "data-path"}  # placeholders: never from a note's HTML
# A style attribute keeps these properties only (colour, alignment, size, borders: what notes
# use), so that no note can lay a fixed box over the page, its header and its key form.
# Values are plain: no function but a colour's (no url(), no min(0px - 9em)), no escapes, no
# negative lengths (a negative margin would pull a box up over the header).
STYLE_PROPERTIES = re.compile(r"(?:background-)?color|background|text-align|text-decoration|font-(?:weight|style|size)"
                              r"|(?:max-|min-)?(?:width|height)|vertical-align|float|clear|display|white-space"
                              r"|(?:margin|padding)(?:-(?:top|right|bottom|left))?|list-style-type|border-radius"
                              r"|border(?:-(?:top|right|bottom|left))?(?:-(?:width|style|color))?")
UNSAFE_STYLE_VALUE = re.compile(r"[\\@<>]|-\s*\.?\d|(?<![\w-])(?!(?:rgba?|hsla?)\()[\w-]*\(", re.I)
DANGEROUS_URL = re.compile(r"(?:javascript|vbscript|livescript|data(?!:image/(?:png|gif|jpe?g|webp)[;,])):", re.I)
HTML_TAG = re.compile(r"""<(/?)([A-Za-z][\w:-]*)((?:[^<>"']|"[^<"]*"|'[^<']*')*)>|<!--.*?-->""", re.S)  # no '<' inside:
# linear on "<a <a <a …" (one regex call is one C call: the render watchdog cannot stop it midway)
HTML_TAG_ONLY = re.compile(HTML_TAG.pattern.rsplit("|", 1)[0], re.S)  # for text where no comment can end
HTML_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""")

BLOCK_QUOTE = re.compile(r" {0,3}> ?")
LIST_ITEM = re.compile(r"( {0,3})(?:([-+*])|(\d{1,9})[.)])(?= |$)")
FOOTNOTE = re.compile(r" {0,3}\[\^[^\]\s]+\]:")
THEMATIC_BREAK = re.compile(r" {0,3}(?:(?:\*[ ]*){3,}|(?:-[ ]*){3,}|(?:_[ ]*){3,})$")
FENCE = re.compile(r"( {0,3})(`{3,}(?!.*`)|~{3,})[ ]*([^\s`{]*)")
MATH_FENCE = re.compile(r" {0,3}\$\$")
ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:[ ]|$)")
TABLE_DELIMITER = re.compile(r" {0,3}\|?[ ]*:?-+:?[ ]*(?:\|[ ]*:?-+:?[ ]*)*\|?[ ]*$")
HTML_BLOCK_TAGS = (
    "address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd|details|dialog|dir|"
    "div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset|h[1-6]|head|header|hr|html|iframe|legend|"
    "li|link|main|menu|menuitem|nav|noframes|ol|optgroup|option|p|param|picture|search|section|summary|table|"
    "tbody|td|tfoot|th|thead|title|tr|track|ul")
HTML_BLOCK = re.compile(r" {0,3}<(?:(!--)|(pre)(?=[\s>]|$)|/?(?:%s)(?=[\s/>]|$))" % HTML_BLOCK_TAGS, re.I)
HTML_LONE_TAG = re.compile(r""" {0,3}(?:<[A-Za-z][\w-]*(?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*"""
                           r"""\s*/?>|</[A-Za-z][\w-]*\s*>)[ ]*$""")


def refuse_tags(text):
    """Return text with refused tags turned to text (outside code spans), as GitHub does:
    otherwise '#### What does the <script> tag do?' would hide the rest of the page."""
    if "<" not in text:
        return text
    out, position = [], 0
    for span in CODE_SPAN.finditer(text) if "`" in text else ():
        out.append(REFUSED_TAG.sub(r"&lt;\1", text[position:span.start()]))
        out.append(span.group(0))
        position = span.end()
    out.append(REFUSED_TAG.sub(r"&lt;\1", text[position:]))
    return "".join(out)


def safe_attribute(name, value):
    """False for an attribute a note's HTML may not keep: an event handler, one in
    REFUSED_ATTRIBUTES, or any whose value is a script URL."""
    name = name.lower()
    return not (name.startswith("on") or name in REFUSED_ATTRIBUTES or (value and not safe_url(value)))


def safe_style(style):
    """Return the declarations of a style attribute that STYLE_PROPERTIES allows, or None."""
    kept = []
    for declaration in style.split(";"):
        name, colon, value = declaration.partition(":")
        name = name.strip().lower()
        if colon and STYLE_PROPERTIES.fullmatch(name) and not UNSAFE_STYLE_VALUE.search(value):
            kept.append(f"{name}:{value.strip()}")
    return ";".join(kept) or None


def is_punctuation(character):
    return not (character.isalnum() or character.isspace())


def safe_url(url):
    """False for a URL that would run script when followed (javascript:, and friends)."""
    cleaned = re.sub(r"[\x00-\x20\x7f]+", "", html.unescape(url))
    return not DANGEROUS_URL.match(cleaned)


def clean_html(fragment):
    """Return raw HTML from a note with its tags kept but defused: refused tags become text,
    event handlers and script URLs are dropped, and a '<' that starts no well-formed tag is
    escaped, so that nothing can reach into the markup that follows."""
    out, position = [], 0
    for match in html_tags(fragment):
        out.append(fragment[position:match.start()].replace("<", "&lt;"))
        position = match.end()
        closing, name = match.group(1), match.group(2)
        if name is None:  # a comment: emptied, since browsers end one at "<!-->" or "--!>"
            out.append("<!-- -->")
        elif name.lower() in REFUSED_TAGS:
            out.append("&lt;" + match.group(0)[1:])
        elif closing:
            out.append(f"</{name}>")
        else:
            attributes = []
            for attribute in HTML_ATTRIBUTE.finditer(match.group(3)):
                name_as_written, value = attribute.group(1), attribute.group(2)
                value = value[1:-1] if value and value[0] in "\"'" else value
                if name_as_written.lower() == "style":
                    value = safe_style(html.unescape(value or ""))
                    if value is None:
                        continue
                if safe_attribute(name_as_written, value) and name_as_written.lower() not in OUR_ATTRIBUTES:
                    attributes.append(name_as_written if value is None else
                                      f'{name_as_written}="{html.escape(html.unescape(value))}"')
            end = "/>" if match.group(3).rstrip().endswith("/") else ">"
            out.append(f"<{name}{''.join(' ' + a for a in attributes)}{end}")
    out.append(fragment[position:].replace("<", "&lt;"))
    return "".join(out)


def html_tags(fragment):
    """HTML_TAG's matches in fragment, found in linear time: past the last "-->" no comment
    can end, and trying one there at each "<!--" would read to the end every time."""
    comments_end = fragment.rfind("-->") + 3 if "-->" in fragment else 0
    yield from HTML_TAG.finditer(fragment, 0, comments_end)
    yield from HTML_TAG_ONLY.finditer(fragment, comments_end)


class Container:
    """An open block quote or list item while GitHubBlocks reads a note."""
    __slots__ = ("quote", "width", "marker", "depth", "started", "indent")

    def __init__(self, quote, width=0, marker="", depth=0):
        self.quote, self.width, self.marker, self.depth = quote, width, marker, depth
        self.started, self.indent = False, 4 * (depth - 1) if depth else 0


class GitHubBlocks(Preprocessor):
    """CommonMark's block structure, rewritten into the form Python-Markdown reads.

    GitHub nests list items by their content's column (2 spaces under "- ", 3 under "1. ")
    where Python-Markdown wants 4; lets a list or a table start right under a paragraph
    line; and allows fenced code anywhere, in list items and block quotes too.  So this
    reads the containers (quotes, list items) as CommonMark does and writes them again:
    markers 4 spaces a level, blank lines where Python-Markdown needs them.  Code blocks
    (fenced and indented), $$ math and HTML blocks are taken out whole into the HTML stash,
    so nothing inside them is read as markdown and their indentation cannot confuse it.
    """

    def run(self, lines):
        self.md.safe_stash = set()  # stash entries that need no cleaning (see SafeRawHtml)
        self.in_comment = False
        self.out, self.stack, self.leaf, self.block_indent, self.quote_closed = [], [], None, 0, None
        self.lines = lines
        for number, line in enumerate(lines):
            self.number = number
            self.read(line)
        self.close_containers(0)
        while self.out and not self.out[-1]:
            self.out.pop()
        return self.out + ["", ""]  # as Python-Markdown ends a document: one last block, closed

    # -- reading --------------------------------------------------------------

    def read(self, line):
        if self.leaf is None or self.leaf[0] != "fence":
            line = self.uncommented(line)
            if line is None:
                return
        matched, position = self.match_containers(line)
        rest = line[position:]
        if self.leaf is not None and self.leaf[0] == "fence":
            if matched == len(self.stack):
                return self.fence_line(rest)
            self.close_leaf()
        if self.leaf is not None and self.leaf[0] == "html":  # a comment or <pre> ends at its end
            if matched == len(self.stack) and (rest.strip() or self.leaf[2]):  # marker, others at a blank
                self.leaf[1].append(rest)
                return self.end_html_if_done(rest)
            self.close_leaf()
        if matched < len(self.stack):
            if self.leaf == ("paragraph",) and rest.strip() and not self.starts_block(rest):
                return self.emit(rest.lstrip())  # a lazy continuation line
            closed, item = self.stack[matched], self.list_item(rest)
            self.close_containers(matched)
            if closed.quote or not item or closed.marker[0].isdigit() != item[0][0].isdigit():
                self.emit_blank()  # "- a\n---", "> a\n- b": Python-Markdown would read one block
        rest = self.open_containers(rest)
        self.leaf_line(rest)

    def uncommented(self, line):
        """Return line without Obsidian's %%comments%% (which may span lines), or None when
        nothing of it is left to read.  A %% inside `code` is text."""
        original, kept = line, []
        while True:
            mark = comment_mark(line)
            if self.in_comment:
                if mark < 0:
                    line = ""
                    break
                line, self.in_comment = line[mark + 2:], False
            elif mark < 0:
                kept.append(line)
                break
            else:
                kept.append(line[:mark])
                line, self.in_comment = line[mark + 2:], True
        line = "".join(kept)
        return None if line != original and not line.strip() else line

    def match_containers(self, line):
        """Return (how many open containers this line continues, where its content starts)."""
        position = 0
        for matched, container in enumerate(self.stack):
            if container.quote:
                mark = BLOCK_QUOTE.match(line, position)
                if not mark:
                    return matched, position
                position = mark.end()
            elif line[position:].strip():
                indent = len(line) - position - len(line[position:].lstrip(" "))
                if indent < container.width:
                    return matched, position
                position += container.width
        return len(self.stack), position

    def starts_block(self, rest):
        """True when rest opens a block, so it cannot continue a paragraph lazily.  (Any list
        item does: the paragraph it would interrupt is in a container this line leaves.)"""
        return bool(BLOCK_QUOTE.match(rest) or self.list_item(rest) or FENCE.match(rest)
                    or ATX_HEADING.match(rest) or THEMATIC_BREAK.match(rest) or HTML_BLOCK.match(rest))

    def list_item(self, rest, interrupting=False):
        """Return (marker, width, length of its first line's marker) when rest starts a list
        item or a footnote, else None.  Later lines of the item are indented by width."""
        if THEMATIC_BREAK.match(rest):
            return None
        item = LIST_ITEM.match(rest)
        if item:
            after = rest[item.end():]
            empty = not after.strip()
            if interrupting and (empty or (item.group(3) and int(item.group(3)) != 1)):
                return None  # CommonMark: only "1." or a non-empty bullet item may interrupt a paragraph
            spaces = len(after) - len(after.lstrip(" "))
            width = item.end() + (1 if empty or spaces > 4 else spaces)
            marker = (item.group(2) or item.group(3) + ".") + " "
            return marker, width, width
        footnote = FOOTNOTE.match(rest)  # its later lines are indented by 4, whatever its label's length
        if footnote:
            after = rest[footnote.end():]
            return footnote.group(0).strip() + " ", 4, footnote.end() + len(after) - len(after.lstrip(" "))
        return None

    def open_containers(self, rest):
        """Open the quotes and list items that rest starts with; return what is left of it."""
        while True:
            quote = BLOCK_QUOTE.match(rest)
            if quote:
                self.close_leaf()
                if self.quote_closed == len(self.stack):  # two quotes apart stay apart (Python-Markdown
                    self.stash("<!-- -->")                  # would join them into one)
                self.stack.append(Container(True))
                rest = rest[quote.end():]
                continue
            in_paragraph = self.leaf == ("paragraph",)
            item = self.list_item(rest, interrupting=in_paragraph)
            if item is None:
                return rest
            marker, width, consumed = item
            if in_paragraph and not self.in_item():  # "Text:\n- a": GitHub makes a list of it
                self.emit_blank()
            self.close_leaf()
            self.stack.append(Container(False, width, marker, self.item_depth() + 1))
            rest = rest[consumed:]

    def item_depth(self):
        depth = 0
        for container in reversed(self.stack):
            if container.quote:
                break
            depth += 1
        return depth

    def in_item(self):
        return bool(self.stack) and not self.stack[-1].quote

    def leaf_line(self, rest):
        """Read what is left of a line once its containers are known."""
        if not rest.strip():
            if self.leaf is not None and self.leaf[0] == "indented":
                self.leaf[1].append("")
                return
            self.close_leaf()
            return self.emit_blank()
        fence = FENCE.match(rest)
        if fence:
            self.close_leaf()
            self.leaf = ("fence", [], fence.group(2), len(fence.group(1)), fence.group(3))
            return
        if self.leaf is not None and self.leaf[0] == "math":
            self.leaf[1].append(rest)
            if rest.rstrip().endswith("$$"):
                self.close_leaf()
            return
        if MATH_FENCE.match(rest) and not rest.strip()[2:].rstrip().endswith("$$"):
            self.close_leaf()
            self.leaf = ("math", [rest.strip()])
            return
        indent = len(rest) - len(rest.lstrip(" "))
        if indent >= 4 and self.leaf != ("paragraph",):
            if self.leaf is None or self.leaf[0] != "indented":
                self.close_leaf()
                self.leaf = ("indented", [])
            self.leaf[1].append(rest[4:])
            return
        if self.leaf is not None and self.leaf[0] == "indented":
            self.close_leaf()
        html_block = HTML_BLOCK.match(rest)
        if html_block or (self.leaf != ("paragraph",) and HTML_LONE_TAG.match(rest)):
            self.close_leaf()
            end = "-->" if html_block and html_block.group(1) else "</pre>" if html_block and html_block.group(2) else ""
            self.leaf = ("html", [rest], end)
            return self.end_html_if_done(rest)
        if self.leaf == ("paragraph",) and self.table_starts(rest):
            self.emit_blank()  # "Text\n| a | b |": GitHub makes a table of it
        if ATX_HEADING.match(rest):  # spaces run together, as a page shows them anyway: the heading
            level = rest.lstrip().partition(" ")[0]  # regex cannot then backtrack through thousands of them
            self.close_leaf()
            return self.emit(refuse_tags(" ".join([level] + heading_text(rest.lstrip()[len(level):]).split())))
        self.leaf = ("paragraph",)
        self.emit(refuse_tags(rest.lstrip()))  # trailing spaces kept: two of them break the line

    def table_starts(self, rest):
        """True when rest is a table's header row: the next line is its delimiter row."""
        if "|" not in rest or self.number + 1 >= len(self.lines):
            return False
        following = self.lines[self.number + 1]
        _, position = self.match_containers(following)
        delimiter = following[position:]
        return bool(TABLE_DELIMITER.match(delimiter)) and \
            delimiter.strip().strip("|").count("|") == rest.strip().strip("|").count("|")

    def fence_line(self, rest):
        kind, lines, fence, indent, info = self.leaf
        stripped = rest.strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]) and \
                len(rest) - len(rest.lstrip(" ")) < 4:
            return self.close_leaf()
        lines.append(rest[min(indent, len(rest) - len(rest.lstrip(" "))):])

    def end_html_if_done(self, rest):
        end = self.leaf[2]
        if end and end in rest.lower() and (len(self.leaf[1]) > 1 or rest.lower().index(end) > 4):
            self.close_leaf()

    # -- writing --------------------------------------------------------------

    def close_containers(self, keep):
        self.close_leaf()
        if any(container.quote for container in self.stack[keep:]):
            self.quote_closed = keep
        del self.stack[keep:]
        blank = self.blank_line()
        last = self.out[-1].replace(" ", "") if self.out else ""
        if last.startswith(">") and not last.strip(">") and self.out[-1] != blank:
            self.out[-1] = blank  # the closed quote's last line was blank: it is not the quote's any more

    def close_leaf(self):
        """Finish the leaf block being read: code, math and HTML go to the stash."""
        leaf, self.leaf = self.leaf, None
        if leaf is None or leaf[0] == "paragraph":
            return
        kind, lines = leaf[0], leaf[1]
        if kind == "indented":
            while lines and not lines[-1].strip():
                lines.pop()
            self.stash(code_block("\n".join(lines), ""))
            self.emit_blank()
        elif kind == "fence":
            self.stash(code_block("\n".join(lines), leaf[4]))
        elif kind == "math":
            self.stash(f'<div class="math">{html.escape(chr(10).join(lines))}</div>')
        else:
            self.stash(clean_html("\n".join(lines)), block=not self.in_item())  # refused tags become text there

    def stash(self, html_text, block=True):
        """Put HTML in the stash and its placeholder in the text, as a block of its own
        (or, in a tight list item, on the item's line, as GitHub renders it)."""
        self.md.safe_stash.add(self.md.htmlStash.html_counter)
        placeholder = self.md.htmlStash.store(html_text)
        tight = self.in_item() and self.out and self.out[-1].strip() not in ("", ">")
        if not tight and block:
            self.emit_blank()
        self.emit(placeholder)
        if not tight and block:
            self.emit_blank()

    def blank_line(self):
        """Return an empty line in the current containers: a '>' for each quote, indented as
        the list item that holds it."""
        line, indent = "", 0
        for container in self.stack:
            if container.quote:
                line, indent = line + " " * indent + ">", 0
            elif container.started:
                indent = container.indent
        return line

    def emit_blank(self):
        """Write an empty line in the current containers (a quote keeps its '>')."""
        line = self.blank_line()
        if self.out and self.out[-1] == line:
            return
        self.out.append(line)
        quotes = [number for number, container in enumerate(self.stack) if container.quote]
        for container in self.stack[quotes[-1] + 1 if quotes else 0:]:  # items in the innermost quote:
            if container.started:  # ones around it see a quote's line, not a blank one
                container.indent = 4 * container.depth  # what follows a blank line is a block of its own
        self.block_indent = None

    def emit(self, content):
        """Write a line of content with the prefix Python-Markdown needs for its containers."""
        prefix, indent, markers = [], 0, ""
        for container in self.stack:
            if container.quote:  # a quote in a list item is indented as the item's text ("- > a" too)
                prefix.append(" " * indent + markers + "> ")
                indent, markers = 0, ""
            elif not container.started:  # "1. - a": both markers on the line, the outer first
                container.started = True
                indent = indent if markers else 4 * (container.depth - 1)
                markers += container.marker
            else:
                indent = container.indent
        content = markers + content
        if self.block_indent is not None and indent < self.block_indent:
            self.emit_blank()  # a block that began indented would take this line in
        if self.block_indent is None:
            self.block_indent = indent
        self.quote_closed = None
        self.out.append("".join(prefix) + " " * indent + content)


@functools.lru_cache(maxsize=256)
def lexer_for(language):
    """Return Pygments' lexer for a language name, or None (one per name: they keep no state)."""
    try:
        return get_lexer_by_name(language)
    except (ClassNotFound, ValueError):
        return None


def comment_mark(line):
    """Return where the first %% outside a code span is in line, or -1."""
    position = 0
    for span in CODE_SPAN.finditer(line) if "`" in line else ():
        found = line.find("%%", position, span.start())
        if found >= 0:
            return found
        position = span.end()
    return line.find("%%", position)


def code_block(code, info):
    """Return the HTML of a code block: coloured when Pygments is installed and the
    language is given; mermaid and other diagrams stay readable source."""
    language = info.split("{")[0].strip()
    lexer = HtmlFormatter and language and lexer_for(language.lower())
    if lexer:
        return pygments_highlight(code, lexer, CODE_FORMATTER)
    css = f' class="language-{html.escape(language)}"' if language else ""
    return f"<pre><code{css}>{html.escape(code)}\n</code></pre>"


class SpacedHeadings(HashHeaderProcessor):
    """'# Title' is a heading, '#tag' is not: GitHub wants a space after the hashes."""
    RE = re.compile(r"(?:^|\n)(?P<level>#{1,6})(?P<header>(?:[ \t](?:\\.|[^\\#\n]|#+(?=[^#\n])"
                    r"|(?<![ \t])#+(?=[ \t]*(?:\n|$)))*?)?)"  # "## C#": a closing run needs a space before it
                    r"(?:[ \t]#+)?[ \t]*(?:\n|$)")


class Strikethrough(InlineProcessor):
    """~~struck~~ (and ~struck~) becomes <del>, with CommonMark's flanking rules, so that
    "about ~3 MB (~15 s)" keeps its tildes."""
    TAG = "del"

    def handleMatch(self, match, data):
        before, after = data[match.start() - 1:match.start()], data[match.end():match.end() + 1]
        first, last = match.group(2)[0], match.group(2)[-1]
        if (is_punctuation(first) and before and not (before.isspace() or is_punctuation(before))) or \
                (is_punctuation(last) and after and not (after.isspace() or is_punctuation(after))):
            return None, None, None
        element = etree.Element(self.TAG)
        element.text = match.group(2)
        return element, match.start(0), match.end(0)


class LiteralMath(InlineProcessor):
    """$x$ and $$x$$ stay as written: no emphasis inside, no escapes taken away."""

    def handleMatch(self, match, data):
        element = etree.Element("span")
        element.set("class", "math")
        element.text = AtomicString(match.group(0))
        return element, match.start(0), match.end(0)


class WikiLinks(InlineProcessor):
    """[[Note]], [[Note|label]], [[Note#Heading]], [[Note#^block]], [[#Heading]] and their
    embeds, ![[Note]], ![[image.png|300]], become placeholders, resolved per request (see
    Linker): whether a private note may be linked or included depends on the request's key,
    not on the cached HTML.  The label stays markdown: [[x|**bold**]] is bold."""

    def handleMatch(self, match, data):
        embed, target, label = match.group(1), match.group(2).strip(), match.group(3)
        if not target or target.startswith(("$", " ")):
            return None, None, None  # [[ $a == $b ]] is no link: left as it is written
        link = etree.Element("a")
        link.set("data-wiki", target)
        link.set("data-text", match.group(0))
        if embed:
            link.set("data-embed", (label or "").strip())
        elif label is not None and label.strip():
            link.text = label.strip()
        return link, match.start(0), match.end(0)


class Highlights(Strikethrough):
    """==marked== becomes <mark>, with the same flanking rules as ~~struck~~."""
    TAG = "mark"


class Escapes(InlineProcessor):
    """A backslash before any ASCII punctuation makes it text, as CommonMark says: '\\$5',
    '\\~~not struck~~', '\\==x==', 'List\\<String>'.  Python-Markdown's own escapes cover a
    few characters, and those it marks as its escape does, so that it knows them later (as
    \\| in tables).  A run of escapes is taken at once: one at a time, each starting the
    search over, "\\*" * 50000 took 10 s."""

    def handleMatch(self, match, data):
        marked = self.md.ESCAPED_CHARS
        return "".join(f"{STX}{ord(c)}{ETX}" if c in marked else c for c in match.group(0)[1::2]), \
            match.start(0), match.end(0)  # stashed as text: a "<" is escaped


class Tags(InlineProcessor):
    """#tag and #nested/tag become links to a search for that tag ('#1984' is no tag: a tag
    needs a character that is not a digit)."""
    ANCESTOR_EXCLUDES = ("a",)

    def handleMatch(self, match, data):
        tag = match.group(1).rstrip("/-")
        if not tag or tag.replace("/", "").replace("-", "").isdigit():
            return None, None, None
        link = etree.Element("a", {"class": "tag", "href": "/?q=" + urllib.parse.quote("#" + tag)})
        link.text = "#" + tag
        return link, match.start(0), match.start(0) + 1 + len(tag)


class BlockIds(Treeprocessor):
    """A '^block-id' at the end of a paragraph or list item becomes its anchor, unseen; on a
    line of its own after a list, table or quote it names that block (Obsidian's rule)."""
    MARK = re.compile(r"(?:^|\s)\^([A-Za-z0-9-]+)[ \t]*$")

    def run(self, root):
        for parent in list(root.iter()):
            previous = None
            for element in list(parent):
                if element.tag in ("p", "li", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6") and element.text \
                        and not len(element):
                    mark = self.MARK.search(element.text)
                    if mark and not element.text[:mark.start()].strip() and previous is not None:
                        previous.set("id", "^" + mark.group(1))  # the id alone on its line: the block before it
                        parent.remove(element)
                        continue
                    if mark:
                        element.set("id", "^" + mark.group(1))
                        element.text = element.text[:mark.start()]
                previous = element


SIZE = re.compile(r"(\d+)(?:x(\d+))?")  # an image's width, or widthxheight (Obsidian's "|300x200")


class ImageSizes(Treeprocessor):
    """![alt|300](src) and ![300x200](src) size an image, as in Obsidian."""
    def run(self, root):
        for image in root.iter("img"):
            alt, _, option = image.get("alt", "").rpartition("|")
            size = SIZE.fullmatch(option.strip())
            if size:
                image.set("alt", alt.strip())
                image.set("width", size.group(1))
                if size.group(2):
                    image.set("height", size.group(2))


class TaskLists(Treeprocessor):
    """- [ ] and - [x] items get a checkbox (disabled: a page cannot save it back)."""
    MARK = re.compile(r"\[([ xX])\][ \t]+")  # GitHub wants the space, even at the end of the line

    def run(self, root):
        for item in root.iter("li"):
            holder = item[0] if len(item) and item[0].tag == "p" and not (item.text or "").strip() else item
            mark = self.MARK.match(holder.text or "")
            if not mark:
                continue
            box = etree.Element("input", {"type": "checkbox", "disabled": "disabled"})
            if mark.group(1) != " ":
                box.set("checked", "checked")
            box.tail, holder.text = holder.text[mark.end():], None
            holder.insert(0, box)
            item.set("class", "task-list-item")


CALLOUTS = {  # callout name: (colour, icon path in a 24x24 box); aliases below
    "note": ("blue", "M12 20h9M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4Z"),
    "abstract": ("cyan", "M9 2h6v4H9zM5 4h4M15 4h4v18H5V4M9 12h6M9 16h6"),
    "info": ("blue", "M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20ZM12 16v-4M12 8h0"),
    "todo": ("blue", "M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20ZM8 12l3 3 5-6"),
    "tip": ("cyan", "M12 2c1 4 6 6 6 12a6 6 0 0 1-12 0c0-3 2-5 3-6 0 2 1 3 2 3 0-4-1-6 1-9Z"),
    "success": ("green", "M20 6 9 17l-5-5"),
    "question": ("orange", "M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20ZM9 9a3 3 0 1 1 4 3c-1 .5-1 1-1 2M12 17h0"),
    "warning": ("orange", "M12 3 2 20h20ZM12 9v5M12 17h0"),
    "failure": ("red", "M18 6 6 18M6 6l12 12"),
    "danger": ("red", "M13 2 3 14h9l-1 8 10-12h-9Z"),
    "bug": ("red", "M8 8h8v8a4 4 0 0 1-8 0ZM9 4l2 3M15 4l-2 3M3 12h5M16 12h5M4 19l4-3M20 19l-4-3"),
    "example": ("purple", "M8 6h13M8 12h13M8 18h13M3 6h0M3 12h0M3 18h0"),
    "quote": ("gray", "M3 21c3 0 7-1 7-8V5H3v7h4c0 4-2 6-4 6ZM14 21c3 0 7-1 7-8V5h-7v7h4c0 4-2 6-4 6Z"),
}
CALLOUT_ALIASES = {"summary": "abstract", "tldr": "abstract", "hint": "tip", "important": "tip", "check": "success",
                   "done": "success", "help": "question", "faq": "question", "caution": "warning",
                   "attention": "warning", "fail": "failure", "missing": "failure", "error": "danger",
                   "cite": "quote"}
GITHUB_ALERTS = {"NOTE": "blue", "TIP": "green", "IMPORTANT": "purple", "WARNING": "orange", "CAUTION": "red"}


class Callouts(Treeprocessor):
    """> [!type] Title: a coloured box with an icon.  Obsidian's callouts (their types and
    aliases; '-' starts folded, '+' open, in a <details>) and GitHub's alerts ([!NOTE],
    [!TIP], [!IMPORTANT], [!WARNING], [!CAUTION], in GitHub's colours) are one construct."""
    MARK = re.compile(r"[ \t]*\[!([\w-]+)\]([+-]?)[ \t]*(.*)")

    def run(self, root):
        for quote in list(root.iter("blockquote")):
            first = quote[0] if len(quote) else None
            mark = self.MARK.match(first.text or "") if first is not None and first.tag == "p" else None
            if mark:
                self.make_callout(quote, first, mark)

    def make_callout(self, quote, first, mark):
        name, fold, title = mark.group(1), mark.group(2), mark.group(3).partition("\n")[0].strip()
        kind = CALLOUT_ALIASES.get(name.lower(), name.lower())
        colour, icon = CALLOUTS.get(kind, CALLOUTS["note"])
        if name in GITHUB_ALERTS and not fold:
            colour = GITHUB_ALERTS[name]
        quote.tag = "details" if fold else "div"
        quote.set("class", f"callout callout-{colour}")
        quote.set("data-callout", kind)
        if fold == "+":
            quote.set("open", "open")
        heading = etree.Element("summary" if fold else "p", {"class": "callout-title"})
        svg = (f'<svg class="callout-icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">'
               f'<path d="{icon}"/></svg>')
        self.md.safe_stash.add(self.md.htmlStash.html_counter)
        heading.text = self.md.htmlStash.store(svg) + " " + (title or name.capitalize())
        rest = (first.text or "").partition("\n")[2] if "\n" in (first.text or "") else ""
        first.text = rest
        if not rest.strip() and not len(first):
            quote.remove(first)
        quote.insert(0, heading)


class VaultPaths(Treeprocessor):
    """Marks links and images to a relative path ([x](Note.md), ![](pic.png)) for the Linker,
    which finds their targets per request: Obsidian writes the shortest path that names one
    file, often just its name, and means it from anywhere in the vault."""

    def run(self, root):
        for element in root.iter():
            name = {"a": "href", "img": "src"}.get(element.tag)
            value = element.get(name) if name else None
            if value and is_relative(value):
                attributes = list(element.attrib.items())  # the mark before href or src, in the
                element.attrib.clear()                      # order written and in sorted order
                element.set("data-path", "")
                element.attrib.update(attributes)


def is_relative(url):
    """True for a URL that is a path from the note's folder (no scheme, host, query or /)."""
    parts = urllib.parse.urlsplit(url)
    return bool(parts.path) and not (parts.scheme or parts.netloc or parts.query or parts.path.startswith("/"))


class BareLinks(Treeprocessor):
    """https://… and www.… in text become links, trailing punctuation left out (GFM's
    extended autolinks; the rules are the GFM spec's)."""
    URL = re.compile(r"(?<![^\s*_~(])(?:https?://|www\.)[^\s<\x02\x03]+")  # at a line's start, or after a space or *_~(
    EMAIL = re.compile(r"(?<![^\s*_~(])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}(?<![-_])\b")  # bounded:
    # linear on "____…", where every character may start one
    SKIP = {"a", "code", "pre", "kbd", "script", "style", "span"}

    def run(self, root):
        self.linkify(root)

    def linkify(self, element):
        for child in list(element):
            if child.tag not in self.SKIP:
                self.linkify(child)
            if self.may_link(child.tail):
                self.split(element, child, child.tail, tail=True)
        if element.tag not in self.SKIP and self.may_link(element.text):
            self.split(element, None, element.text, tail=False)

    @staticmethod
    def may_link(text):
        """A cheap look before the regexes: most text holds no address at all."""
        return bool(text) and ("://" in text or "www." in text or "@" in text)

    def split(self, parent, child, text, tail):
        pieces, position, links = [], 0, []
        for match in sorted(list(self.URL.finditer(text)) + list(self.EMAIL.finditer(text)), key=lambda m: m.start()):
            if match.start() < position:
                continue
            url = trim_url(match.group(0))
            if not re.match(r"(?:https?://|www\.)[\w-]", url) and "@" not in url:
                continue  # a domain must follow, as cmark-gfm (GitHub's renderer) wants: "https://" alone is text
            pieces.append(text[position:match.start()])
            href = url if "://" in url else f"mailto:{url}" if "@" in url and "/" not in url else "http://" + url
            link = etree.Element("a", {"href": href})
            link.text = url
            links.append(link)
            position = match.start() + len(url)
        if not links:
            return
        pieces.append(text[position:])
        if tail:
            child.tail = pieces[0]
            index = list(parent).index(child) + 1
        else:
            parent.text = pieces[0]
            index = 0
        for offset, (link, after) in enumerate(zip(links, pieces[1:])):
            link.tail = after
            parent.insert(index + offset, link)


def trim_url(url):
    """Drop what GFM leaves out of an autolink's end: punctuation, an unmatched ')', an entity."""
    while True:
        before = url
        url = url.rstrip("?!.,:*_~'\"")
        if url.endswith(")") and url.count(")") > url.count("("):
            url = url[:-1]
        entity = re.search(r"&\w+;$", url)
        if entity:
            url = url[:entity.start()]
        if url == before:
            return url


class SafeAttributes(Treeprocessor):
    """[x](javascript:…) loses its URL: run last, after every other extension has added what
    it adds.  An HTML placeholder that ended up inside an attribute (a link title spanning an
    HTML block's line) is dropped: Python-Markdown would put the HTML back there, inside the
    quotes, where its own quotes could add any attribute.  The CSP is the second line of defence."""

    def run(self, root):
        for element in root.iter():
            for name, value in list(element.attrib.items()):
                if "\x02" in value:
                    element.attrib[name] = value = HTML_PLACEHOLDER_RE.sub("", value)
                if not safe_attribute(name, value):
                    del element.attrib[name]


class SafeRawHtml(Postprocessor):
    """Raw HTML that Python-Markdown took from the text inline (<kbd>, <img>, <br>) is defused
    like the HTML blocks, just before it goes back into the page.  What mdserve stashed
    itself is safe already (md.safe_stash); the toc extension runs postprocessors once per
    heading, so each fragment is cleaned once and remembered."""

    def run(self, text):
        stash, safe = self.md.htmlStash, self.md.safe_stash
        for number in range(len(stash.rawHtmlBlocks)):
            if number not in safe and isinstance(stash.rawHtmlBlocks[number], str):
                stash.rawHtmlBlocks[number] = clean_html(stash.rawHtmlBlocks[number])
                safe.add(number)
        return text


class GitHubDialect(Extension):
    """Registers the constructs above (GitHub's, and the Obsidian ones that share them)."""

    def extendMarkdown(self, md):
        md.preprocessors.register(GitHubBlocks(md), "github_blocks", 25)
        md.preprocessors.deregister("html_block")  # HTML blocks are read above, as CommonMark reads them
        md.parser.blockprocessors.register(SpacedHeadings(md.parser), "hashheader", 70)
        md.inlinePatterns.register(SubstituteTagInlineProcessor(r"\\\n", "br"), "backslash_break", 185)
        md.inlinePatterns.register(LiteralMath(r"(?<![\\$\w])\$\$?(?=[^\s$])(?:[^$\n]|\n(?!\n))+?(?<=[^\s\\])"
                                               r"\$\$?(?![$\w])", md), "math", 186)
        md.inlinePatterns.register(WikiLinks(WIKI_LINK, md), "wikilink", 183)  # before \| is unescaped
        md.inlinePatterns.register(Escapes(r"(?:\\[!-/:-@\[-`{-~])+", md), "escapes", 181)  # before escape
        md.inlinePatterns.register(Tags(TAG, md), "tag", 105)  # after links: no tag inside a link's text
        md.inlinePatterns.register(Strikethrough(r"(?<!~)(~~?)(?!~)(?=\S)(.+?)(?<=\S)(?<!~)\1(?!~)", md),
                                   "strikethrough", 65)
        md.inlinePatterns.register(Highlights(r"(?<!=)(==)(?!=)(?=\S)(.+?)(?<=\S)(?<!=)\1(?!=)", md), "highlight", 64)
        md.treeprocessors.register(Callouts(md), "callouts", 30)
        md.treeprocessors.register(TaskLists(md), "task_lists", 29)
        md.treeprocessors.register(BlockIds(md), "block_ids", 28)
        md.treeprocessors.register(ImageSizes(md), "image_sizes", 16)
        md.treeprocessors.register(BareLinks(md), "bare_links", 15)
        md.treeprocessors.register(VaultPaths(md), "vault_paths", 2)
        md.treeprocessors.register(SafeAttributes(md), "safe_attributes", 1)  # after toc (5): last
        md.postprocessors.register(SafeRawHtml(md), "safe_raw_html", 35)


# Rendering ###################################################################

class TooSlow(BaseException):
    """Raised inside a computation that ran past its deadline (see Watchdog)."""


class Watchdog:
    """Interrupts a thread that overruns its deadline, by raising TooSlow in it.

    Python-Markdown has quadratic corners (Python-Markdown#798: "[" * 10000 takes seconds)
    that no check of the input foresees, so a render gets a deadline instead.  The
    exception is raised with CPython's PyThreadState_SetAsyncExc, at the next bytecode
    the thread runs; where ctypes is missing, nothing is interrupted (a render that was
    slow is still remembered as slow, so it is not forced to run again).
    """

    def __init__(self):
        self.lock, self.deadlines, self.wakeup, self.thread = threading.Lock(), {}, threading.Event(), None
        try:
            import ctypes
            self.raise_in = ctypes.pythonapi.PyThreadState_SetAsyncExc
            self.ident, self.exception = ctypes.c_ulong, ctypes.py_object(TooSlow)
        except (ImportError, AttributeError):
            self.raise_in = None

    @contextlib.contextmanager
    def limit(self, seconds):
        """Run the body with a deadline: TooSlow is raised in it once seconds have passed."""
        if self.raise_in is None:
            yield
            return
        ident = threading.get_ident()
        with self.lock:
            self.deadlines[ident] = time.monotonic() + seconds
            if self.thread is None:
                self.thread = threading.Thread(target=self.watch, name="mdserve-watchdog", daemon=True)
                self.thread.start()
        self.wakeup.set()
        try:
            yield
        finally:
            with self.lock:
                fired = self.deadlines.pop(ident, None) is None
                if fired:  # an exception set but not yet raised must not go off in the caller later
                    self.raise_in(self.ident(ident), None)
            if fired:
                raise TooSlow()

    def watch(self):
        while True:
            with self.lock:
                now = time.monotonic()
                for ident, deadline in list(self.deadlines.items()):
                    if deadline <= now:
                        del self.deadlines[ident]
                        self.raise_in(self.ident(ident), self.exception)
                wait = min(self.deadlines.values(), default=now + 60) - now
            self.wakeup.wait(max(wait, 0.01))
            self.wakeup.clear()


WATCHDOG = Watchdog()  # one for the process: it only sleeps until the nearest render deadline
_renderers = queue.SimpleQueue()  # Markdown objects keep state: one per render at a time, reused


def render_markdown(text):
    """Return (HTML, table of contents HTML or '') for markdown text."""
    try:
        md = _renderers.get_nowait()
    except queue.Empty:
        # "extra" less fenced_code and md_in_html, whose work GitHubBlocks does as GitHub does it
        extensions = ["abbr", "def_list", "footnotes", "tables", "toc", "sane_lists", GitHubDialect()]
        md = markdown.Markdown(extensions=extensions, extension_configs={
            "toc": {"permalink": "#", "permalink_title": "Link to this section", "slugify": slugify}})
    body, toc, stack, headings = md.reset().convert(text), md.toc, list(md.toc_tokens), 0
    _renderers.put(md)  # only a renderer that finished cleanly is used again
    while stack:
        headings += 1
        stack.extend(stack.pop()["children"])
    opened = " open" if headings <= 12 else ""  # a long contents list starts folded, out of the text's way
    contents = f'<details class="contents"{opened}><summary>Contents</summary>{toc}</details>'
    return body, (contents if headings >= 3 else "")


EMBED_DEPTH = 3        # a note embedded in a note embedded in a note, and no deeper
EMBED_BUDGET = 20      # notes included in one page at most: past that, links
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".bmp", ".avif", ".ico")
AUDIO_FILES = (".mp3", ".wav", ".ogg", ".oga", ".m4a", ".flac", ".opus")
VIDEO_FILES = (".mp4", ".webm", ".ogv", ".mov", ".mkv")


class Linker:
    """Makes an article's wiki-link and embed placeholders into links, images and included
    notes for one request.  Whether a private note may be linked or included depends on the
    request's key, so this is done per request, never in the cached HTML.  A private note
    that the request's key does not open is drawn as a missing one; including one counts
    against the key, as asking for it would."""

    def __init__(self, handler):
        self.handler, self.index, self.key = handler, handler.server.index, handler.key
        self.budget, self.found, self.paths = EMBED_BUDGET, {}, {}

    def resolve(self, article, rel, depth=0, seen=()):
        """Return article with every placeholder in it made real, as seen from the note rel."""
        if "data-path=" in article:  # before notes are included: theirs are seen from their own folders
            article = PATH_PLACEHOLDER.sub(lambda match: self.path_tag(match, rel), article)
        if "data-wiki=" not in article:
            return article
        return WIKI_PLACEHOLDER.sub(lambda match: self.replace(match, rel, depth, seen + (rel,)), article)

    def path_tag(self, match, rel):
        """Return the start of a markdown link's or image's tag, its path made a URL (path_url)."""
        written = match.group(5)
        if (written, rel) not in self.paths:
            self.paths[written, rel] = html.escape(self.path_url(html.unescape(written), rel))
        return f'<{match.group(1)}{match.group(2)}{match.group(3)} {match.group(4)}="{self.paths[written, rel]}"'

    def path_url(self, written, rel):
        """Return where a markdown link or image to a relative path leads: to that path when it
        is there for this request, else to what a wiki link of that name finds (Obsidian's
        way), else to the path as written.  Either way the URL is made absolute, so that it
        works in a note included in another one, and an [x](Note.md#A%20B) anchor becomes
        the heading's id."""
        path, hash_mark, anchor = written.partition("#")
        name = urllib.parse.unquote(path, errors="surrogateescape")  # a name that is not UTF-8 too
        as_written = posixpath.normpath("/" + posixpath.join(rel.rpartition("/")[0], name.lstrip("/")))
        as_written = "/" + as_written.lstrip("/")  # never "//host"
        as_written += "/" if path.endswith("/") and as_written != "/" else ""
        server = self.handler.server
        try:  # a folder ([docs](docs/)) is a folder, not a note that shares its name; unless
            kind, real, _ = locate(server.root, quote_url(as_written), server.forbidden)  # hidden
            is_folder = kind == "folder" and self.index.folder_visible(relative(server.root, real), self.key)
        except HTTPError:
            is_folder = False
        found = None
        for candidate in () if is_folder or path.endswith("/") else ("./" + name, name):
            found = self.lookup(candidate, rel)
            if found is not None and self.opens(found[3]):
                break
            found = None
        key = self.key_for(found[3]) if found else ""
        if " " in urllib.parse.unquote(anchor) and not anchor.startswith("^"):
            anchor = slugify(urllib.parse.unquote(anchor))
        return ("/" + quote_url(found[0]) if found else quote_url(as_written)) + key + hash_mark + anchor

    def replace(self, match, rel, depth, seen):
        attributes = dict(re.findall(r'(data-\w+)="([^"]*)"', match.group(2)))
        name, _, anchor = html.unescape(attributes["data-wiki"]).partition("#")
        found = self.lookup(name, rel)
        if "data-embed" in attributes:
            made, block = self.embed(found, name, rel, anchor, html.unescape(attributes["data-embed"]),
                                     attributes["data-text"], depth, seen)
        else:
            made, block = self.link(found, name, anchor, match.group(3), attributes["data-text"]), False
        if block and match.group(1) and match.group(4):
            return made  # an included note is a block of its own, not the text of a paragraph
        return (match.group(1) or "") + made + (match.group(4) or "")

    def lookup(self, name, rel):
        """Return (relative path, real path, kind, Note or None) of what a link names, or None;
        once per name in a request, however often a page repeats a link."""
        if (name, rel) not in self.found:
            self.found[name, rel] = self.look_up(name, rel)
        return self.found[name, rel]

    def look_up(self, name, rel):
        handler = self.handler
        target = self.index.find(name, rel.rpartition("/")[0], self.key) if name.strip() else rel
        if target is None:
            return None
        try:  # as the file is now, not as last indexed
            kind, real, status = locate(handler.server.root, quote_url("/" + target), handler.server.forbidden)
        except HTTPError:
            return None
        if kind == "folder":  # a note that became a folder since it was indexed
            return None
        if kind == "file":  # a file whose first line is a password line is as private as a note
            password = password_in(real)
            return target, real, kind, None if password is None else Note(target, password, None, 0, 0)
        return target, real, kind, handler.note(real, status) if kind == "note" else None

    def opens(self, note):
        """True when this request may see what a link found (note: its Note, None for a public file)."""
        return note is None or may_open(note.password, self.key)

    def key_for(self, note):
        """Return the '?access_key=…' a URL to what a link found carries: only to a private one."""
        return self.handler.key_query() if note is not None and note.password is not None else ""

    def link(self, found, name, anchor, label, written):
        """Return the HTML of a wiki link: a link to the note (and heading or block), or the
        link's text as written, marked as broken."""
        if found is None or not self.opens(found[3]):
            return broken(written, f"No note named {name}")
        target, _, _, note = found
        key = self.key_for(note)
        href = ("" if not name.strip() else "/" + quote_url(target) + key) + fragment(anchor)
        shown = " > ".join(part for part in [name.strip()] + anchor.split("#") if part)
        return f'<a class="wikilink" href="{html.escape(href)}">{label or html.escape(shown)}</a>'

    def embed(self, found, name, rel, anchor, option, written, depth, seen):
        """Return (HTML, is it a block) for an embed: an image, a player, a link to another
        kind of file, or the note (or its heading's section, or its block) included."""
        if found is None:
            if self.key is not None and self.index.find(name, rel.rpartition("/")[0], private_too=True):
                self.handler.refused = True  # a private note by that name: including it is asking for it
            return broken(written, "Nothing to embed by that name"), False
        target, real, kind, note = found
        source = html.escape("/" + quote_url(target))
        if not self.opens(note):
            if self.key is not None:
                self.handler.refused = True  # including a private note is asking for it
            return broken(written, "Nothing to embed by that name"), False
        key = self.key_for(note)
        if kind == "file":
            return media(source + html.escape(key), target, option), False
        title = f'<a href="{source}{html.escape(key + fragment(anchor))}">{html.escape(note.title)}</a>'
        if depth >= EMBED_DEPTH or target in seen or self.budget <= 0:  # deep enough, a loop, or enough
            return f'<p class="embed-title">{title}</p>', True            # for one page: a link instead
        self.budget -= 1
        note, article = self.handler.article(real, target, note)
        body = section(article_body(article), anchor)
        body = self.resolve(body, target, depth + 1, seen)
        return f'<div class="embed"><p class="embed-title">{title}</p>{body}</div>', True


def broken(written, why):
    """Return a wiki link or embed that leads nowhere this request may go: its text as written."""
    return f'<span class="broken" title="{html.escape(why)}">{written}</span>'


def slugify(text, separator="-"):
    """Return a heading's id as GitHub makes it (github-slugger), so that a README's own
    table of contents finds its headings: lower case; letters, digits and marks of any
    script kept with '-' and '_'; other punctuation and symbols (emoji too) dropped; each
    space a hyphen ("A & B" is "a--b")."""
    kept = "".join(c for c in text.strip().lower() if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", separator)


def fragment(anchor):
    """Return the #fragment of a page for a wiki link's anchor: a heading's id, as the toc
    extension makes it, or a block's ^id."""
    last = anchor.split("#")[-1].strip()
    if not last:
        return ""
    return "#" + (last if last.startswith("^") else slugify(plain_text(last)))


def media(source, target, option):
    """Return the element that shows an embedded file: <img>, <audio>, <video> or a link."""
    size = SIZE.fullmatch(option.strip())
    dimensions = "" if not size else f' width="{size.group(1)}"' + (f' height="{size.group(2)}"' if size.group(2)
                                                                    else "")
    name = html.escape(readable(target.rpartition("/")[2]))
    suffix = os.path.splitext(target)[1].lower()
    if suffix in IMAGE_FILES:
        alt = html.escape(option.strip()) if option.strip() and not size else name
        return f'<img src="{source}" alt="{alt}"{dimensions}>'
    if suffix in AUDIO_FILES:
        return f'<audio controls src="{source}"></audio>'
    if suffix in VIDEO_FILES:
        return f'<video controls src="{source}"{dimensions}></video>'
    return f'<a class="attachment" href="{source}">{name}</a>'


def article_body(article):
    """Return a rendered article without its <article> wrapper and table of contents."""
    body = article[len("<article>"):-len("</article>")] if article.startswith("<article>") else article
    return re.sub(r'^<details class="contents".*?</details>', "", body, count=1, flags=re.S)


def section(body, anchor):
    """Return the part of a rendered note that anchor names: a heading and what follows it up
    to the next heading of its level or higher, or the block with that ^id; all of it when
    there is no anchor or nothing by that name."""
    last = anchor.split("#")[-1].strip()
    if not last:
        return body
    wanted = last if last.startswith("^") else slugify(plain_text(last))
    element = re.search(r'<(\w+)[^<>]* id="%s"' % re.escape(html.escape(wanted)), body)  # in a tag, not in text
    if not element:
        return body
    start, tag = element.start(), element.group(1)
    if re.fullmatch(r"h[1-6]", tag):
        level = int(tag[1])
        end = re.compile(r"<h[1-%d][ >]" % level).search(body, start + 1)
        return body[start:end.start() if end else len(body)]
    return body[start:element_end(body, start, tag)]


def element_end(markup, start, tag):
    """Return where the element that starts at start ends (our own rendered HTML)."""
    depth, tags = 0, re.compile(r"<(/?)%s[\s>/]" % tag)
    for match in tags.finditer(markup, start):
        depth += -1 if match.group(1) else 1
        if depth == 0:
            return markup.find(">", match.start()) + 1
    return len(markup)


def quote_url(path):
    """Return path quoted for an href (a note named 'a?b#c.md' must stay one path).  A name
    that is not UTF-8 is quoted byte for byte, so that its link leads back to it."""
    return urllib.parse.quote(path, safe="/", errors="surrogateescape")


def readable(name):
    """Return a file name fit to show: bytes that are not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
    """Return an escaped, highlighted excerpt of text, as plain text (no markup, a link as
    its text), around the first of words it holds."""
    text = strip_comments(text)  # a comment cut in two by the window would show
    lowered = text.casefold()
    found = [i for i in (lowered.find(w.casefold()) for w in words) if i >= 0]
    at = min(found) if found else 0
    begin = text.rfind("\n", 0, max(0, at - 300)) + 1    # whole lines, so no construct is cut in two
    end = text.find("\n", at + 600)
    window = text[begin:end if end >= 0 else len(text)]
    if begin == 0 and window.startswith("# "):  # the title: the result shows it already
        window = window.partition("\n")[2]
    plain = " ".join(plain_text(window).split())
    lowered = plain.casefold()
    found = [i for i in (lowered.find(w.casefold()) for w in words) if i >= 0]
    start = max(0, min(found) - width // 3) if found else 0
    start = plain.rfind(" ", 0, start) + 1 if start else 0  # whole words
    excerpt = plain[start:start + width * 2]
    more = start + width * 2 < len(plain) or end >= 0
    return ("…" if start or begin else "") + highlight(excerpt, words) + ("…" if more else "")


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


class SingleFlight:
    """Runs one computation per key at a time, at most `slots` at once: whoever asks for a
    key already being computed waits for that result instead of computing it again."""

    def __init__(self, slots):
        self.lock, self.running = threading.Lock(), {}
        self.slots = threading.BoundedSemaphore(slots)

    def run(self, key, compute):
        with self.lock:
            flight = self.running.get(key)
            leader = flight is None
            if leader:
                flight = self.running[key] = [threading.Event(), None]
        if not leader:
            flight[0].wait()
            if flight[1] is None:
                raise RuntimeError("the computation this request waited for failed")
            return flight[1]
        try:
            with self.slots:
                flight[1] = compute()
        finally:
            with self.lock:
                del self.running[key]
            flight[0].set()
        return flight[1]


def search_terms(query):
    """Return the distinct words of a search, at most SEARCH_TERMS: letters and digits only,
    so nothing a user types is ever search syntax ("title:", NEAR(, OR, quotes, *, -, ^)."""
    terms = []
    for word in re.findall(r"[^\W_]+", query):
        word = word.casefold()
        if word not in terms:
            terms.append(word)
    return terms[:SEARCH_TERMS]


def match_expression(terms, column=None, prefixes=True):
    """Return the FTS5 query for terms: every word, each also matching the words it begins
    once it is long enough (with prefixes)."""
    words = " ".join(f'"{t}"*' if prefixes and len(t) >= MIN_PREFIX else f'"{t}"' for t in terms)
    return f"{column} : ({words})" if column else words


def scope_token(folder):
    """Return the word that the text index files every note under folder with ('' for all)."""
    return "zzscope" + hashlib.blake2b(folder.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def index_fields(rel):
    """Return (the words of a note's folder and file name, its folder scope words) for the text index."""
    folders = rel.split("/")[:-1]
    names = " ".join(folders + [os.path.splitext(rel.rpartition("/")[2])[0]])
    scopes = " ".join(scope_token("/".join(folders[:depth])) for depth in range(1, len(folders) + 1))
    return names, scopes


class NoteIndex:
    """Everything known of the notes without reading them again: titles, privacy, the names
    wiki links use, links between notes (for backlinks), tags, and a full-text index.

    One background thread, the indexer, walks the folder at start-up and then again and
    again at a bounded rate; a request never walks or indexes.  Requests that read a note
    keep what they learn (title, privacy) in memory, where listings find it.

    The index is SQLite in a temporary file, in WAL mode, so requests read on connections of
    their own while the indexer writes, and no lock is held while they run.  The text is in
    FTS5 tables that hold no copy of it (contentless), and private notes are in the second
    one, as their links and tags are in rows marked with their opener: a request without a
    key never reads what private notes hold, so its time cannot depend on it.  A
    contentless row cannot be deleted, so a changed note gets a new row, and the notes table
    says which rows are current; the index is built afresh once the dead rows outnumber the
    live ones.  Without FTS5 (some Python builds) search reads the files instead.
    """

    def __init__(self, root, note_limit, forbidden=(), fts=True, busy=lambda: False):
        self.root, self.note_limit, self.forbidden, self.busy = root, note_limit, forbidden, busy
        self.notes = {}                                    # relative path -> Note without its text
        self.stems = collections.defaultdict(set)          # file name less suffix, casefolded -> paths
        self.aliases = collections.defaultdict(set)        # front matter alias, casefolded -> paths
        self.files = collections.defaultdict(set)          # other files (attachments) by name, casefolded
        self.folders = collections.defaultdict(collections.Counter)  # folder -> its notes, by who may open them
        self.openers = collections.Counter()               # opener digest -> notes it opens
        self.secret, self.digests = os.urandom(32), {}
        self.lock = threading.Lock()                       # for changes to the maps above
        self.generation = 0                                # changes whenever any note does (pages cache by it)
        self.total = self.done = self.dead = 0
        self.next_row = 1
        self.complete, self.stopped, self.nudge = threading.Event(), threading.Event(), threading.Event()
        self.passes, self.passes_done, self.passes_changed = 0, 0, threading.Condition()
        self.thread = None
        self.readers = queue.SimpleQueue()
        self.folder = tempfile.mkdtemp(prefix="mdserve-")  # 0700: the index is the user's alone
        self.path = os.path.join(self.folder, "index.sqlite3")
        self.db = self.connect()
        self.fts = self.create_tables(fts)

    def connect(self):
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # a temporary index: a crash loses nothing worth keeping
        return db

    def create_tables(self, fts=True):
        """Create the index; return whether it has the text tables (False without FTS5)."""
        for sql in ("CREATE TABLE IF NOT EXISTS notes(row INTEGER PRIMARY KEY, path TEXT NOT NULL, opener BLOB)",
                    "CREATE INDEX IF NOT EXISTS notes_by_path ON notes(path)",
                    "CREATE TABLE IF NOT EXISTS links(row INTEGER, stem TEXT, target TEXT, opener BLOB)",
                    "CREATE INDEX IF NOT EXISTS links_by_stem ON links(stem, opener)",
                    "CREATE INDEX IF NOT EXISTS links_by_row ON links(row)",
                    "CREATE TABLE IF NOT EXISTS tags(row INTEGER, tag TEXT, opener BLOB)",
                    "CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag, opener)",
                    "CREATE INDEX IF NOT EXISTS tags_by_row ON tags(row)"):
            self.db.execute(sql)
        for tokenizer in ("unicode61 remove_diacritics 2", "unicode61") if fts else ():
            try:
                for table in ("public_text", "private_text"):
                    # detail=column: no word positions (searches match words, never phrases), which
                    # measured 150 MB instead of 253 at 100,000 notes, and faster queries.
                    self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5(title, names, body, "
                                    f"scope, content='', detail=column, tokenize='{tokenizer}')")
                    # Title words weigh most, then folder and file names; scope words are for filtering only.
                    self.db.execute(f"INSERT INTO {table}({table}, rank) VALUES ('rank', 'bm25(10.0, 5.0, 1.0, 0.0)')")
                return True
            except sqlite3.OperationalError:
                continue
        return False

    # -- what requests ask -----------------------------------------------------

    def note(self, rel, real, status):
        """Return the Note at rel as it is on disk now: from memory while its (mtime, size)
        still match, else read again, and then with its text, for a caller about to render."""
        known = self.notes.get(rel)
        if is_current(known, status):
            return known
        note = read_note(real, self.note_limit)
        self.remember(rel, note, 0)  # the indexer brings the text index up to date on its next pass
        return note

    def opener(self, password):
        """Return what stands for a password in memory and in the index: a keyed digest, so
        a key is looked up without comparing it with each password (None: public).  Digests
        are remembered (a bounded few: guesses must not fill memory) for the keys in use."""
        if password is None:
            return None
        if not password:
            return b""  # an empty password opens nothing: no digest equals b""
        digest = self.digests.get(password)
        if digest is None:
            digest = hmac.new(self.secret, password.encode("utf-8", "surrogateescape"), "sha256").digest()
            if len(self.digests) >= 1024:
                self.digests.clear()
            self.digests[password] = digest
        return digest

    def opens_any(self, key):
        """True when key opens at least one private note the index knows of."""
        return key is not None and self.openers.get(self.opener(key), 0) > 0

    def folder_visible(self, folder, key):
        """False for a folder whose notes are all private to this request: even its name is hidden."""
        if not self.complete.is_set():  # not all counted yet: look, rather than show a private name
            return self.scan_visible(folder, key)
        counts = self.folders.get(folder)
        if not counts or not counts["private"]:
            return True
        return counts["notes"] > counts["private"] or (key is not None and counts[self.opener(key)] > 0)

    def scan_visible(self, folder, key):
        """folder_visible before the first walk is done: look at the notes' first lines, until
        one this request may open turns up (most folders: the first note)."""
        private, stack = False, [os.path.join(self.root, folder)]
        while stack:
            try:
                with os.scandir(stack.pop()) as entries:  # read lazily: the first public note ends it
                    for entry in entries:
                        if entry.name.startswith(".") or is_link(entry):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.name.lower().endswith(NOTE_SUFFIXES):
                            known = self.notes.get(relative(self.root, entry.path))
                            password = known.password if known is not None else password_in(entry.path)
                            if may_open(password, key):
                                return True
                            private = True
            except OSError:
                continue
        return not private

    def find(self, written, folder, key=None, private_too=False):
        """Return the relative path of the note or file a wiki link names, found as Obsidian
        finds it: a path from the linking note's folder for ./ and ../; else by name, any
        case, a note's .md optional, another file's extension not: in the linking note's
        folder first, then the one with the fewest folders.  A name with folders must match
        the end of a path.  Failing all that, a note whose front matter gives it that alias.
        Notes this key does not open are not candidates (unless private_too): a private note
        must not shadow a public one, or its existence would show."""
        target = written.strip().replace("\\", "/")
        if target.startswith(("./", "../")):
            path = posixpath.normpath(posixpath.join(folder, target)).casefold()
            with self.lock:
                pool = self.files.get(path.rpartition("/")[2], set()) | self.stems.get(stem_of(path), set())
            return next((r for r in sorted(pool) if r.casefold() in (path, path + ".md", path + ".markdown")), None)
        target = target.strip("/")
        base, wanted = target.rpartition("/")[2].casefold(), note_stem(target.casefold())
        with self.lock:  # notes first (a link without an extension means a note), then other files
            pools = [set(self.stems.get(note_stem(base), ())), set(self.files.get(base, ())),
                     set(self.aliases.get(target.casefold(), ()))]
            passwords = {r: self.notes[r].password for pool in pools for r in pool if r in self.notes}
        for number, pool in enumerate(pools):
            if "/" in target and number < 2:
                pool = {r for r in pool if note_stem(r.casefold()) == wanted
                        or note_stem(r.casefold()).endswith("/" + wanted)}
            pool = [r for r in pool if private_too or may_open(
                passwords[r] if r in passwords else password_in(os.path.join(self.root, r)), key)]
            if pool:
                return min(pool, key=lambda r: (r.rpartition("/")[0] != folder, r.count("/"), r))
        return None

    def backlinks(self, rel, key):
        """Return [(relative path, title, is it private)] of the notes this request may open
        that link to rel or embed it, by title."""
        known = self.notes.get(rel)
        if not is_utf8(rel):  # not in the index: nothing can be found linking to it
            return []
        names = {stem_of(rel)} | {alias.casefold() for alias in (known.aliases if known else ())}
        opener = self.opener(key) if self.opens_any(key) else None
        db, found = self.reader(), {}
        try:
            for name in names:
                rows = db.execute("SELECT n.path, l.target FROM links AS l JOIN notes AS n ON n.row = l.row "
                                  "WHERE l.stem = ? AND l.opener IS NULL LIMIT 1000", (name,)).fetchall()
                if opener:  # a separate look-up: without a key, private notes' rows are never read
                    rows += db.execute("SELECT n.path, l.target FROM links AS l JOIN notes AS n ON n.row = l.row "
                                       "WHERE l.stem = ? AND l.opener = ? LIMIT 1000", (name, opener)).fetchall()
                for source, target in rows:
                    note = self.notes.get(source)  # as last read: a note made private since is private now
                    if source != rel and note is not None and source not in found and may_open(note.password, key) \
                            and (target == "/" + rel or self.find(target, source.rpartition("/")[0], key) == rel):
                        found[source] = (note.title, note.password is not None)
        finally:
            self.readers.put(db)
        return sorted(((source, title, private) for source, (title, private) in found.items()),
                      key=lambda item: (item[1].casefold(), item[0]))

    def search(self, terms, tags, folder, key=None):
        """Return (relative paths of the best matches under folder, best first; None, or why
        the answer may be short).  terms are words, tags are #tags (without the #).  Private
        notes are searched only for a key that opens some, and only those it opens."""
        deadline = time.monotonic() + SEARCH_SECONDS
        opener = self.opener(key) if self.opens_any(key) else None
        if terms and not self.fts:
            return self.scan(terms, tags, folder, opener, deadline + SCAN_SECONDS - SEARCH_SECONDS)
        db = self.reader()
        db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        try:
            hits = []
            for table, who in [("public_text", None)] + ([("private_text", opener)] if opener else []):
                hits += self.ranked(db, table, terms, tags, folder, who) if terms else \
                    self.tagged(db, tags, folder, who)
            return [path for path, _ in sorted(hits, key=lambda hit: hit[1])][:SEARCH_RESULTS], None
        except sqlite3.OperationalError:  # interrupted by the progress handler
            return [], "timeout"
        finally:
            db.set_progress_handler(None, 0)
            self.readers.put(db)

    def reader(self):
        """Return a connection for reading (one per concurrent request, kept for the next)."""
        try:
            return self.readers.get_nowait()
        except queue.Empty:
            return self.connect()

    def ranked(self, db, table, terms, tags, folder, opener):
        """Return [(path, rank)] of the best matches in one text table: ranked in SQL, with a
        LIMIT.  A word is widened to the words it begins only when it finds too few notes as
        it stands (the widening merges many words' lists: costly, and no help when there are
        enough already).  Past RANK_LIMIT matches nothing is ranked (bm25 would score every
        one): title matches come first, then any."""
        where, args = f"{table} MATCH ?" + (" AND n.opener = ?" if opener else ""), (opener,) if opener else ()
        for tag in tags:
            where += " AND f.rowid IN (SELECT row FROM tags WHERE tag = ? AND opener IS ?)"
            args += (tag, opener)
        query = (f"SELECT n.path, {{rank}} FROM {table} AS f JOIN notes AS n ON n.row = f.rowid "
                 f"WHERE {where} {{order}}LIMIT {SEARCH_RESULTS}")
        for prefixes in (False, True):
            match, title = match_expression(terms, None, prefixes), match_expression(terms, "title", prefixes)
            if folder:
                match, title = (f'({m}) AND scope : "{scope_token(folder)}"' for m in (match, title))
            count = db.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {table} MATCH ? LIMIT ?)",
                               (match, RANK_LIMIT + 1)).fetchone()[0]
            if count > RANK_LIMIT or count >= SEARCH_RESULTS:  # enough without the words they begin
                break
        if count <= RANK_LIMIT:  # few enough to rank
            return db.execute(query.format(rank="f.rank", order="ORDER BY f.rank "), (match,) + args).fetchall()
        query = query.format(rank="0", order="")
        hits = db.execute(query, (title,) + args).fetchall()
        seen = {path for path, _ in hits}
        rest = db.execute(query, (match,) + args).fetchall()
        return hits + [hit for hit in rest if hit[0] not in seen]

    def tagged(self, db, tags, folder, opener):
        """Return [(path, 0)] of the notes under folder with every one of tags."""
        low, high = (folder + "/", folder + "0") if folder else ("", "\U0010ffff")  # '0' follows '/'
        where = " AND ".join(["t{0}.tag = ? AND t{0}.opener IS ?".format(n) for n in range(len(tags))])
        joins = " ".join(f"JOIN tags AS t{n} ON t{n}.row = n.row" for n in range(len(tags)))
        args = [value for tag in tags for value in (tag, opener)]
        return db.execute(f"SELECT DISTINCT n.path, 0 FROM notes AS n {joins} WHERE {where} AND n.path >= ? "
                          f"AND n.path < ? ORDER BY n.path LIMIT {SEARCH_RESULTS}", args + [low, high]).fetchall()

    def scan(self, terms, tags, folder, opener, deadline):
        """Search without FTS5: read the notes this request may open, as grep would.  Notes it
        may not open are never read, so the time taken tells nothing of them."""
        prefix, hits = (folder + "/" if folder else ""), []
        for rel, note in sorted(self.notes.items()):
            if not rel.startswith(prefix) or not (note.password is None or self.opener(note.password) == opener) \
                    or not is_utf8(rel):  # not searchable, as with FTS5
                continue
            if time.monotonic() > deadline:
                return hits, "timeout"
            try:
                found = read_note(os.path.join(self.root, rel), self.note_limit)
            except OSError:
                continue
            text = f"{found.title}\n{index_fields(rel)[0]}\n{found.text}".casefold()
            if all(term in text for term in terms) and set(tags) <= set(tags_of(found)):
                hits.append(rel)
                if len(hits) == SEARCH_RESULTS:
                    break
        return hits, None

    def counts(self):
        """Return (public count, private count, relative paths of notes locked for everyone)."""
        notes = [(rel, note.password) for rel, note in list(self.notes.items())]
        private = [rel for rel, password in notes if password is not None]
        return len(notes) - len(private), len(private), sorted(r for r, p in notes if p == "")

    # -- what the indexer keeps -----------------------------------------------

    def remember(self, rel, note, row):
        """Keep what listings need of a note (not its text), and count it by who may open it."""
        kept = Note(note.title, note.password, None, note.mtime_ns, note.size, note.too_large, row,
                    note.aliases, note.tags)
        kept.racy = racy(note.mtime_ns)  # then it is read again next time, whatever its stat says
        with self.lock:
            old = self.notes.get(rel)
            if old is not None:
                self.tally(rel, old, -1)
            self.notes[rel] = kept
            self.tally(rel, kept, 1)
            self.generation += 1
        return kept

    def forget(self, rel):
        with self.lock:
            old = self.notes.pop(rel, None)
            if old is not None:
                self.tally(rel, old, -1)
            self.stems[stem_of(rel)].discard(rel)
            self.generation += 1

    def tally(self, rel, note, sign):
        """Count a note in (sign 1) or out (-1) of the maps that are kept by note."""
        if sign > 0:
            self.stems[stem_of(rel)].add(rel)
        for alias in note.aliases:
            (self.aliases[alias.casefold()].add if sign > 0 else self.aliases[alias.casefold()].discard)(rel)
        opener = self.opener(note.password)
        if opener is not None:
            self.openers[opener] += sign
        parts = rel.split("/")[:-1]
        for depth in range(len(parts) + 1):
            counts = self.folders["/".join(parts[:depth])]
            counts["notes"] += sign
            if opener is not None:
                counts["private"] += sign
                counts[opener] += sign

    def start(self):
        self.thread = threading.Thread(target=self.run, name="mdserve-indexer", daemon=True)
        self.thread.start()

    def run(self):
        """Walk and index, again and again, pausing at least as long as each walk took."""
        while not self.stopped.is_set():
            started = time.monotonic()
            with self.passes_changed:
                self.passes += 1
            try:
                self.index_pass()
            except Exception as error:  # a full disk, say: search goes stale for a while, pages go on
                print(f"mdserve: indexing paused: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                self.stopped.wait(10)
            with self.passes_changed:
                self.passes_done = self.passes
                self.passes_changed.notify_all()
            # Rest as long as the walk took, so the indexer takes at most about half a core; but
            # never long, so that an edit shows up in search within seconds even at 100,000 notes.
            self.nudge.wait(min(max(INDEX_PAUSE, time.monotonic() - started), LONGEST_INDEX_PAUSE))
            self.nudge.clear()

    def settle(self, timeout=30.0):
        """Wait until a walk that began after this call has finished, so that what is on disk
        now is in the index; True unless timeout seconds passed first."""
        with self.passes_changed:
            needed = self.passes + 1
            self.nudge.set()
            return self.passes_changed.wait_for(lambda: self.passes_done >= needed or self.stopped.is_set(),
                                                timeout)

    def index_pass(self):
        """Bring the index up to date with the disk: one walk, reading only what changed."""
        attachments, files = [], []
        for found in note_files(self.root, self.root, self.forbidden, attachments):
            files.append(found)
            if not self.complete.is_set():
                self.total = len(files)  # "Indexing: 0 of 12,345 notes so far", while they are counted
            if len(files) % 64 == 0:
                self.make_way()
        if self.dead > max(10000, len(self.notes)):
            self.rebuild()
        with self.lock:  # names first, so wiki links resolve while the texts are still being read
            for rel, _, _ in files:
                self.stems[stem_of(rel)].add(rel)
            by_name = collections.defaultdict(set)
            for rel in attachments:
                by_name[rel.rpartition("/")[2].casefold()].add(rel)
            if by_name != self.files:
                self.files = by_name
                self.generation += 1  # pages link to files by name too: those cached are out of date
        seen = {rel for rel, _, _ in files}
        for rel in [rel for rel in list(self.notes) if rel not in seen]:
            self.drop(rel)
        self.total, done, committed = len(files), 0, time.monotonic()
        self.db.execute("BEGIN")
        try:
            for rel, real, status in files:
                if self.stopped.is_set():
                    return
                known = self.notes.get(rel)
                if not (is_current(known, status) and known.row):
                    self.make_way()
                    try:
                        self.store(rel, read_note(real, self.note_limit))
                    except OSError:  # vanished or unreadable since the walk
                        pass
                done += 1
                if time.monotonic() - committed > 0.25:  # searches see progress as it is made
                    self.db.execute("COMMIT")
                    self.db.execute("BEGIN")
                    self.done, committed = done, time.monotonic()
        finally:
            self.db.execute("COMMIT")
        self.done = done
        self.complete.set()

    def make_way(self):
        """Let requests go first: while any is being answered, step aside for a moment.  A
        thread that computes holds the GIL for up to 5 ms at a time, and a request thread
        waits that long each time it has read or written anything."""
        if self.busy():
            time.sleep(0.001)

    def store(self, rel, note):
        """Put a note's current version in the index, and its old row out of use."""
        if not is_utf8(rel):  # SQLite holds UTF-8 only: such a note is counted, never searched
            self.remember(rel, note, -1)
            return
        row, self.next_row = self.next_row, self.next_row + 1
        opener = self.opener(note.password)
        if rel in self.notes:  # a new note (every note, on the first walk) has no rows to take out
            self.unlink(rel)
        text = "" if note.too_large else note.text
        if self.fts:
            names, scopes = index_fields(rel)
            self.db.execute(f"INSERT INTO {'public_text' if opener is None else 'private_text'}(rowid, title, names, "
                            f"body, scope) VALUES (?, ?, ?, ?, ?)", (row, note.title, names, strip_comments(text),
                                                                     scopes))
        self.db.execute("INSERT INTO notes(row, path, opener) VALUES (?, ?, ?)", (row, rel, opener))
        links, tags = links_of(rel, text), tags_of(note)
        if links:
            self.db.executemany("INSERT INTO links(row, stem, target, opener) VALUES (?, ?, ?, ?)",
                                [(row, stem, target, opener) for stem, target in links])
        if tags:
            self.db.executemany("INSERT INTO tags(row, tag, opener) VALUES (?, ?, ?)",
                                [(row, tag, opener) for tag in tags])
        self.remember(rel, note, row)

    def unlink(self, rel):
        """Take a note's rows out of the index (its text rows stay, dead, until a rebuild)."""
        if not is_utf8(rel):
            return
        old = self.db.execute("SELECT row FROM notes WHERE path = ?", (rel,)).fetchall()
        for (row,) in old:
            for table in ("notes", "links", "tags"):
                self.db.execute(f"DELETE FROM {table} WHERE row = ?", (row,))
        self.dead += len(old)

    def drop(self, rel):
        self.unlink(rel)
        self.forget(rel)

    def rebuild(self):
        """Start the index afresh (every note is indexed again by this pass)."""
        for table in ("notes", "links", "tags", "public_text", "private_text"):
            self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.fts = self.create_tables(self.fts)
        with self.lock:
            for note in self.notes.values():
                note.row = 0
        self.dead = 0

    def close(self):
        """Stop the indexer and remove the index file."""
        self.stopped.set()
        self.nudge.set()
        if self.thread is not None:
            self.thread.join(10)
        for db in [self.db] + [self.readers.get() for _ in range(self.readers.qsize())]:
            db.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def is_current(known, status):
    """True when a Note kept in memory is still the version on disk."""
    return known is not None and not known.racy and (known.mtime_ns, known.size) == (status.st_mtime_ns,
                                                                                       status.st_size)


def stem_of(rel):
    """Return the name a wiki link uses for the note at rel: its file name less suffix, casefolded."""
    return note_stem(rel.rpartition("/")[2].casefold())


def note_stem(name):
    """Return a name without the suffix of a note (.md, .markdown), if it has one."""
    for suffix in NOTE_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


LINK_IN_TEXT = re.compile(r"\[\[([^\[\]|#\n]*)[^\[\]\n]*\]\]|\]\(<?([^()\[\]\s<>]{1,2000})>?(?:\s+\"[^\"\n]{0,500}\")?\)")


def without_fenced_code(text):
    """Return text without its fenced code blocks (a link or a tag in code is neither)."""
    if "```" not in text and "~~~" not in text:
        return text
    return "\n".join(outside_fences(text.split("\n")))


def strip_comments(text):
    """Return text without Obsidian's %%comments%%, which no reader sees."""
    return re.sub(r"%%.*?%%", " ", text, flags=re.S) if "%%" in text else text


def links_of(rel, text):
    """Return {(stem, target)} for what a note links to or embeds: wiki links by the name
    written (resolved when asked, as Obsidian would), markdown links to notes by their path."""
    folder, found = rel.rpartition("/")[0], set()
    if "[[" not in text and "](" not in text:
        return found
    for match in LINK_IN_TEXT.finditer(strip_comments(without_fenced_code(text))):
        if match.group(1) is not None:
            target = match.group(1).strip().rstrip("\\")
            if target:
                found.add((note_stem(target.rpartition("/")[2].casefold()), target))
            continue
        url = urllib.parse.unquote(match.group(2).partition("#")[0])
        if "://" in url or url.startswith("mailto:") or not url.lower().endswith(NOTE_SUFFIXES):
            continue
        path = posixpath.normpath(url.lstrip("/") if url.startswith("/") else posixpath.join(folder, url))
        if not path.startswith("../"):
            found.add((stem_of(path), "/" + path))
    return found


def tags_of(note):
    """Return a note's tags (front matter and text), casefolded, each with the tags it nests
    in: #a/b is also #a, as Obsidian searches them."""
    text = note.text or ""
    if "#" in text:
        text = strip_comments(without_fenced_code(text))
        text = CODE_SPAN.sub("", text) if "`" in text else text
    tags = set()
    for tag in list(note.tags) + [m.group(1) for m in re.finditer(TAG, text)] if "#" in text else note.tags:
        tag = tag.casefold().strip("/").rstrip("-")
        if tag and not tag.replace("/", "").replace("-", "").isdigit():
            parts = tag.split("/")
            tags.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return tags



# Key guard ###################################################################

@functools.lru_cache(maxsize=4096)
def client_of(address):
    """Return the name a client's guesses count under: its IPv4 address, or its IPv6 /64,
    the network one subscriber gets, so that a /64 does not give 2**64 fresh counters."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 4:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def in_networks(address, networks):
    """True when address (a string) lies in one of networks."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return any(ip in network for network in networks)


def is_address(text):
    """True for an IP address written plainly (as a log line may show it)."""
    try:
        return bool(re.fullmatch(r"[\w:.%-]{1,64}", text)) and bool(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return False


FORWARDING_HEADERS = ("x-forwarded-for", "forwarded")  # nginx, Caddy and the like append to the first


def forwarded_chains(headers, names):
    """Return, for each forwarding header named, the client addresses it reports, first hop
    first (X-Forwarded-For's list, or the for= of RFC 7239's Forwarded)."""
    chains = []
    if "x-forwarded-for" in names:
        chains.append([part.strip() for part in headers["x-forwarded-for"].split(",") if part.strip()])
    forwarded = headers.get("forwarded") if "forwarded" in names else None
    if forwarded:
        chain = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    value = value.strip('"')
                    value = value[1:value.find("]")] if value.startswith("[") else value.rsplit(":", 1)[0] \
                        if value.count(":") == 1 else value
                    chain.append(value)
        chains.append(chain)
    return chains


class KeyGuard:
    """Counts wrong keys per client and locks out a client that keeps guessing.

    Every request with a key counts as a guess when it starts and is forgiven when the key
    proves right: so a burst of concurrent guesses gets no more answers than a slow one.
    Each lock-out is twice as long as the one before, up to LONGEST_LOCKOUT; the doubling
    is forgotten a step for each QUIET_PERIOD without a lock-out.  The table of clients is
    bounded: past max_clients the oldest is dropped.  Only starting a lock-out takes the
    lock; the rest are single deque and dict operations, atomic in CPython, so keyed
    requests from many threads do not queue on it.
    """

    def __init__(self, clock=time.monotonic, max_clients=10000):
        self.clock, self.max_clients = clock, max_clients
        self.clients = collections.OrderedDict()   # client -> [guess times, locked until, lock-outs]
        self.lock = threading.Lock()

    def attempt(self, client_name):
        """Count a guess from a client; return (seconds it must wait, whether this locked it)."""
        now, client = self.clock(), self.clients.get(client_name)
        if client is None:
            client = self.clients.setdefault(client_name, [collections.deque(), -math.inf, 0])
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
            quiet_steps = int((now - client[1]) // QUIET_PERIOD) if client[1] > -math.inf else client[2]
            client[2] = min(max(0, client[2] - quiet_steps) + 1, LOCKOUT_STEPS)
            client[1] = now + min(FIRST_LOCKOUT * 2 ** (client[2] - 1), LONGEST_LOCKOUT)
            self.clients.move_to_end(client_name)
            return math.ceil(client[1] - now), True

    def forgive(self, client_name):
        """Take back the guess counted for a request whose key was right."""
        client = self.clients.get(client_name)
        if client and client[0]:
            try:
                client[0].pop()
            except IndexError:  # emptied by another thread meanwhile
                pass


# Request handler #############################################################

class _DeadlineReader(socket.SocketIO):
    """Socket reads sharing one deadline and byte budget per request, so a client that
    sends a byte a second, or headers without end, cannot hold a thread."""
    deadline, budget, idle, per_read = None, math.inf, None, False

    def readinto(self, buffer):
        # With the kernel's timeouts the deadline is checked after each read, rather than by
        # resetting the socket's timeout: settimeout() is a system call that drops the GIL,
        # and every such handoff costs the hot path dearly.  A TLS read waits for a whole
        # record, which a client can trickle a byte at a time: there each read gets only
        # what is left of the deadline (Python's timeout bounds a whole TLS read).
        if self.per_read:
            left = self.idle if self.deadline is None else self.deadline - time.monotonic()
            self._sock.settimeout(max(min(left, self.idle), 0.001))
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
        seconds = self.server.client_timeout
        tls = isinstance(self.connection, ssl.SSLSocket)
        self.reader = _DeadlineReader(self.connection, "rb")
        self.reader.idle, self.reader.per_read = seconds, tls or not PLATFORM.kernel_timeouts
        if self.reader.per_read:
            self.connection.settimeout(seconds)
            if tls:  # Python's timeout bounds the whole handshake, not each read of it
                self.connection.do_handshake()
        else:
            # The idle timeout is the kernel's (SO_RCVTIMEO/SO_SNDTIMEO): a Python socket timeout
            # would poll() before every recv and send, two more GIL handoffs on every request.
            timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                self.connection.setsockopt(socket.SOL_SOCKET, option, timeval)
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
        self.key, self.url_path, self.query, self.headers = None, "/", {}, {}
        self.guesser, self.refused, self.key_opened = None, False, False
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
        if not self.server.host_allowed(self.headers.get("host")):
            # DNS rebinding: a page on another site whose name now leads here must get nothing.
            return self.send_error(421, explain="This server does not answer to that host name. Use its address, "
                                                "or start it with --allowed-host NAME")
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
            if self.guesser is not None and not self.refused and (self.key_opened or
                                                                  self.server.index.opens_any(self.key)):
                for guesser in self.guesser:
                    self.server.guard.forgive(guesser)  # a right key: nothing was guessed

    # -- request → path guard → note ------------------------------------------

    def route(self):
        """Send the page, listing, search, raw text or file that the request asks for."""
        url_path, _, query = self.path.partition("#")[0].partition("?")
        if not url_path.startswith("/"):
            raise HTTPError(400, "The request target must be a path.")
        self.query = query_params(query)
        self.key = self.query.get("access_key") or None  # an empty key opens nothing, not even
        self.url_path = url_path                               # a note whose empty password locks it
        if self.key is not None:
            self.count_guess()
        kind, real, status, note = self.resolve(url_path)
        if kind == "folder" and not url_path.endswith("/"):
            parts = [p for p in urllib.parse.unquote(url_path).split("/") if p not in ("", ".")]
            location = quote_url("/" + "".join(p + "/" for p in parts))   # one leading slash: never //host
            if query:
                location += "?" + urllib.parse.quote(query, safe="=&%+;/:,@!$'()*?")
            return self.send_body(b"", "text/html", status=301, headers=[("Location", location)])
        if kind == "folder":
            search = self.query.get("q", "")
            if len(search) >= MAX_QUERY_WORDS:
                raise HTTPError(400, "That search is too long.")
            return self.send_search(real, search) if search.split() else self.send_listing(real)
        if kind == "note" and "raw" not in self.query:
            return self.send_note(real, note)
        return self.send_file(real)

    def count_guess(self):
        """Count this keyed request as a guess, to be forgiven if its key opens some note.

        Every answer to a keyed request may depend on whether the key is right (a wiki link
        that works, a lock mark, a search hit), so a key that opens nothing counts as a
        wrong guess whatever was asked for.  Keyed requests that a browser marks as sent by
        another site count apart, so eleven <img> tags elsewhere cannot lock the owner out;
        those that are not a top-level navigation (images, frames, scripts, fetches; no page
        of ours may be framed anyway) are refused uncounted."""
        addresses = self.addresses()  # one, but behind a proxy not yet known two (see addresses)
        self.guesser = [client_of(addresses[0])] if len(addresses) == 1 else \
            list(dict.fromkeys(map(client_of, addresses)))
        if self.headers.get("sec-fetch-site", "none") not in ("none", "same-origin"):
            if self.headers.get("sec-fetch-mode", "navigate") != "navigate" or \
                    self.headers.get("sec-fetch-dest", "document") != "document":
                self.guesser = None
                raise HTTPError(403, "A key is only taken from a link you open, not from another site's page.")
            self.guesser = [guesser + " (cross-site)" for guesser in self.guesser]
        wait, locked_now = self.server.guard.attempt(self.guesser[0])
        for guesser in self.guesser[1:]:
            also_wait, also_locked = self.server.guard.attempt(guesser)
            wait, locked_now = max(wait, also_wait), locked_now or also_locked
        if locked_now:
            self.log_message("locked out for %d s after %d wrong keys", wait, GUESS_LIMIT)
        if wait:
            self.guesser = None  # nothing to forgive: this answer depends on no key
            raise HTTPError(429, "Too many wrong keys from your address. Try again later.",
                            headers=[("Retry-After", str(wait))])

    def address_string(self):
        """Return the client's address, as the log shows it (see addresses)."""
        return self.addresses()[0]

    def addresses(self):
        """Return the client's address: the peer, or behind a trusted proxy the right-most
        address it reports that is not itself a trusted proxy (what came before that is the
        client's own word).  From anyone else, forwarding headers are ignored.

        A proxy fills in one forwarding header and passes the other on as the client wrote
        it.  Which one it fills in shows the first time a request from it lacks the other
        one: a client can add a header, never take the proxy's away.  Until then both count
        (a guess counts against the client each names), and after, only the proxy's."""
        address = self.client_address[0]
        trusted = self.server.trusted_proxies
        if not (trusted and self.headers and in_networks(address, trusted)):
            return [address]
        present = [name for name in FORWARDING_HEADERS if name in self.headers]
        unset = self.server.unset_headers.get(address)
        if unset is None and len(self.server.unset_headers) < 1024:  # one entry a proxy
            unset = self.server.unset_headers.setdefault(address, set())
        if len(present) == 1 and unset is not None:
            unset.update(name for name in FORWARDING_HEADERS if name not in present)
        found, believed = [], [name for name in present if name not in (unset or ())] or present
        for chain in forwarded_chains(self.headers, believed):
            untrusted = [hop for hop in chain if not in_networks(hop, trusted)]
            hop = untrusted[-1] if untrusted else (chain[0] if chain else address)
            found.append(hop if is_address(hop) else urllib.parse.quote(hop[:64], safe=""))  # no forged log lines
        return found or [address]

    def resolve(self, url_path):
        """Return (kind, real path, stat, Note or None) for url_path, or raise HTTPError: 404 when it is
        not there or not to be served, 403 when it is a private note this request's key
        does not open.  A folder with a readable index.md or README.md means that note."""
        root = self.server.root
        kind, real, status = locate(root, url_path, self.server.forbidden, self.server.real_paths)
        if kind == "folder" and real != root and not self.server.index.folder_visible(relative(root, real), self.key):
            raise HTTPError(404)  # a folder of notes all private to this request: as if it were not there
        if kind == "folder" and url_path.endswith("/") and not self.query.get("q", "").strip():
            for name in INDEX_NAMES:
                try:
                    index, index_status = inspect(root, os.path.join(real, name), self.server.forbidden)
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
        self.key_opened = note is not None and note.password is not None  # opened it: no guess
        return kind, real, status, note

    def note(self, real, status):
        """Return the Note at real (without its text), from the index when it is unchanged."""
        return self.server.index.note(relative(self.server.root, real), real, status)

    def refuse(self):
        """Answer 403 with a key form; the request's key, if any, stays counted as a wrong guess."""
        self.refused = True  # the key does not open this note: the guess stands, whatever else it opens
        raise HTTPError(403, main=self.key_form(self.url_path, self.key is not None))

    # -- render → response ----------------------------------------------------

    def send_note(self, real, note):
        """Send a note's page.  It is cached whole until the note, or any note, changes (links
        and backlinks depend on the others), unless it includes other notes; its ETag is its
        content's, so a page reloads only when what it shows has changed."""
        server = self.server
        rel = relative(server.root, real)
        note, article = self.article(real, rel, note)
        if not may_open(note.password, self.key):  # made private since it was indexed
            self.refuse()
        # A keyed page carries its key in its links: cached apart, under the key that opened
        # it (the note's own password), and only for private notes, so wrong keys cannot fill it.
        cache_key = ("page", self.canonical_path(), note.mtime_ns, note.size, self.key, server.index.generation)
        cacheable = (self.key is None or note.password is not None) and "data-embed=" not in article \
            and not racy(note.mtime_ns)
        cached = server.cache.get(cache_key) if cacheable else None
        if cached is None:
            main = Linker(self).resolve(article, rel) + self.backlinks(rel)
            shown = f"{note.mtime_ns}-{note.size}-{main}".encode("utf-8", "replace")
            etag = 'W/"%s"' % hashlib.blake2b(shown, digest_size=12).hexdigest()
            folder = rel.rpartition("/")[0]
            main = self.tag_links_keyed(main) + self.footer(note, rel)
            cached = self.page(f"{note.title} · {self.folder_name(folder)}", main, folder,
                               etag=self.reload_etag(etag)), etag
            if cacheable:
                server.cache.put(cache_key, cached, len(cached[0]))
        body, etag = cached
        self.send_content(body, "text/html; charset=utf-8", etag, note.mtime_ns, note.password is not None,
                          gzip_key=cache_key + ("gzip",) if cacheable else None)

    def article_html(self, real, note):
        """Return a note's article as this request sees it (used under a folder's listing)."""
        rel = relative(self.server.root, real)
        note, article = self.article(real, rel, note)
        return self.links_resolved(article, rel) if may_open(note.password, self.key) else ""

    def links_resolved(self, article, rel):
        """Return article with its wiki links and embeds made real for this request."""
        return self.tag_links_keyed(Linker(self).resolve(article, rel))

    def tag_links_keyed(self, article):
        """Return article with its tag links carrying this request's key, if any."""
        if self.key is None or 'class="tag"' not in article:
            return article
        return article.replace('class="tag" href="/?q=', 'class="tag" href="/?%s&amp;q=' % html.escape(
            urllib.parse.urlencode({"access_key": self.key})))

    def backlinks(self, rel):
        """Return the "Linked from" list: the notes, that this request may open, that link here."""
        sources = self.server.index.backlinks(rel, self.key)
        if not sources:
            return ""
        key = self.key_query()
        items = "".join(f'<li><a href="/{html.escape(quote_url(source))}{key if private else ""}">'
                        f"{html.escape(title)}</a></li>" for source, title, private in sources)
        return f'<nav class="backlinks" aria-label="Linked from"><h2>Linked from</h2><ul>{items}</ul></nav>'

    def article(self, real, rel, note):
        """Return (the Note as rendered, its article HTML): one render per version of a note,
        whatever the URL's spelling and however many ask for it at once."""
        server = self.server
        version = ("html", rel, note.mtime_ns, note.size)
        article = server.cache.get(version)
        if article is not None:
            return note, article
        return server.renders.run(version, lambda: self.render_version(real, rel, note))

    def render_version(self, real, rel, note):
        """Render the note on disk; one that renders too slowly, or too big to keep, is
        remembered, so that asking again cannot make it render again."""
        server = self.server
        fresh = note if note.text is not None else read_note(real, server.note_limit)
        version = ("html", rel, fresh.mtime_ns, fresh.size)
        reason, started = server.unrendered.get(version), time.monotonic()
        if reason is None:
            try:
                with WATCHDOG.limit(server.render_seconds):
                    article = self.render_article(fresh, rel)
            except TooSlow:
                article = None
            if article is None or time.monotonic() - started > server.render_seconds:
                reason = "slow"
            elif len(article) * 2 > server.cache.max_bytes // 2:
                reason = "big"
            if reason:
                self.log_error("%s renders too %s; it is shown as text", rel, reason)
        if reason:
            server.unrendered.put(version, reason, 1)
            article = self.unrendered_article(fresh, rel, reason)
        if not racy(fresh.mtime_ns):
            server.cache.put(version, article, len(article) * 2)
        return fresh, article

    def unrendered_article(self, note, rel, reason):
        """Return the article for a note not rendered: its text as it is, or a pointer to ?raw
        (the footer's raw link, which carries the key where one is needed: this is cached)."""
        if reason == "slow":
            return ('<article><p class="meta-top">This note takes too long to render, so it is shown as it is.</p>'
                    f"<pre>{html.escape(note.text)}</pre></article>")
        return (f"<article><h1>{html.escape(note.title)}</h1><p>This note is {note.size / 2**20:.1f} MB, more "
                "than this server renders. Its text is under <b>raw</b>, below.</p></article>")

    def render_article(self, note, rel):
        """Return the article HTML of a note: contents, then the rendered markdown."""
        if note.too_large:
            return self.unrendered_article(note, rel, "big")
        try:
            body, toc = render_markdown(note.text)
        except Exception:  # e.g. RecursionError on lists nested hundreds deep: show the text instead
            self.log_error("could not render %s; sent as text", rel)
            body, toc = f"<pre>{html.escape(note.text)}</pre>", ""
        if note.tags:  # front matter tags, under the title
            tags = " ".join(f'<a class="tag" href="/?q={html.escape(urllib.parse.quote("#" + tag))}">'
                            f"#{html.escape(tag)}</a>" for tag in note.tags)
            after = body.find("</h1>") + 5 if body.startswith("<h1") else 0
            body = f'{body[:after]}<p class="tags">{tags}</p>{body[after:]}'
        return f"<article>{toc}{body}</article>"

    def canonical_path(self):
        """Return the request's path decoded, without empty or '.' steps: one spelling per page."""
        parts = [p for p in urllib.parse.unquote(self.url_path).split("/") if p not in ("", ".")]
        return "/" + "/".join(parts) + ("/" if parts and self.url_path.endswith("/") else "")

    def footer(self, note, rel):
        """Return the small print under a note: its file, when it changed, its raw text."""
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(note.mtime_ns / 1e9))
        raw = html.escape(quote_url(rel.rpartition("/")[2]) + "?raw" + self.key_query().replace("?", "&"))
        return f'<p class="meta">{html.escape(readable(rel))} · modified {modified} · <a href="{raw}">raw</a></p>'

    def send_listing(self, real):
        """Send a folder's sub-folders and the notes this request may see, by title.  A
        sub-folder whose notes are all private to this request is left out, name and all."""
        root, index = self.server.root, self.server.index
        folders, notes = [], []
        with os.scandir(real) as entries:
            entries = sorted(entries, key=lambda e: e.name.casefold())
        readme = None
        for entry in entries:
            try:
                target, status = inspect(root, entry.path, self.server.forbidden)
                if status and stat.S_ISDIR(status.st_mode):
                    if index.folder_visible(relative(root, target), self.key):
                        folders.append(entry.name)
                elif status and stat.S_ISREG(status.st_mode) and entry.name.lower().endswith(NOTE_SUFFIXES):
                    note = index.note(relative(root, entry.path), target, status)
                    if may_open(note.password, self.key):
                        notes.append((note.title.casefold(), entry.name, note))
                        if entry.name.lower() in README_NAMES and readme is None:
                            readme = (target, note)
            except OSError:  # vanished or unreadable since scandir: leave it out
                continue
        key = self.key_query()
        rows = [f'<li class="dir"><a href="../{key}">..</a></li>'] if real != root else []
        rows += [f'<li class="dir"><a href="{html.escape(quote_url(name))}/{key}">{html.escape(readable(name))}/</a>'
                 '</li>' for name in folders]
        for _, name, note in sorted(notes):
            lock = LOCK if note.password is not None else ""
            modified = time.strftime("%Y-%m-%d", time.localtime(note.mtime_ns / 1e9))
            rows.append(f'<li>{lock}<a href="{html.escape(quote_url(name))}{key if lock else ""}">'
                        f'{html.escape(note.title)}</a> <small>{html.escape(readable(name))} · {modified}</small></li>')
        folder = relative(root, real)
        title = self.folder_name(folder)
        empty = "" if folders or notes else "<p>No notes here yet.</p>"
        below = f'<section class="readme">{self.article_html(*readme)}</section>' if readme else ""
        main = f'<h1>{html.escape(title)}</h1><ul class="list">{"".join(rows)}</ul>{empty}{below}'
        page_title = f"{title} · {self.folder_name('')}" if folder else title
        self.send_generated(self.page(page_title, main, folder))

    def send_search(self, real, query):
        """Send the notes under a folder holding every word, title matches first."""
        root, index = self.server.root, self.server.index
        tags = [tag.casefold().strip("/") for tag in re.findall(TAG, query)]
        folder, terms, results = relative(root, real), search_terms(re.sub(TAG, " ", query)), []
        hits, stopped = index.search(terms, tags, folder, self.key) if terms or tags else ([], None)
        for rel in hits:
            try:  # re-read: privacy and snippet come from the file as it is now
                target, status = inspect(root, os.path.join(root, *rel.split("/")), self.server.forbidden)
                note = read_note(target, self.server.note_limit) if target else None
            except OSError:
                continue
            if note is not None and may_open(note.password, self.key):
                results.append((rel, note))
        results.sort(key=lambda hit: not all(t in hit[1].title.casefold() for t in terms))  # stable: rank kept
        key = self.key_query()
        rows = "".join(
            f'<li>{LOCK if note.password is not None else ""}<a href="/{html.escape(quote_url(rel))}'
            f'{key if note.password is not None else ""}">{highlight(note.title, terms)}</a> '
            f'<small>{html.escape(rel)}</small><p>{snippet(note.text, terms)}</p></li>'
            for rel, note in results)
        shown = " ".join(query.split())
        where = f" in {html.escape(self.folder_name(folder))}" if folder else ""
        count = len(results)
        more, plural = "+" if count == SEARCH_RESULTS else "", "s" if count > 1 else ""
        found = f"{count}{more} note{plural}" if count else "No notes"
        notice = "" if index.complete.is_set() else \
            f" Indexing: {index.done:,} of {index.total:,} notes so far."
        if stopped:
            notice += " The search took too long and was stopped: try fewer or longer words."
        main = (f'<h1>Search: {html.escape(shown)}</h1><p class="meta-top">{found}{where}.{notice}</p>'
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
            self.key_opened = password is not None  # a right key for a private file is no guess
            skip = len(first) + 1 if password is not None else 0
            length = status.st_size - skip
            etag = f'W/"{status.st_mtime_ns:x}-{status.st_size:x}-{self.server.salt}"'
            if status.st_size <= SMALL_FILE:  # read whole: a file truncated meanwhile still answers whole
                return self.send_content(head[skip:], content_type, etag, status.st_mtime_ns, password is not None,
                                         gzip_key=("gzip", real, status.st_mtime_ns, status.st_size, skip), file=True)
            headers = self.validators(etag, status.st_mtime_ns, password is not None)
            if self.not_modified(headers[0][1], status.st_mtime_ns):
                return self.send_body(b"", None, status=304, headers=headers, file=True)
            self.send_body(None, content_type, headers=headers + [("Content-Length", str(length))], file=True)
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

    def send_content(self, body, content_type, etag, mtime_ns, private, gzip_key=None, file=False):
        """Send body with its validators: a 304 when the client's copy is current; gzipped
        (once, when gzip_key names it in the cache) for clients that take it, unless a key
        is involved: compressed secrets next to guessable text are a compression oracle."""
        headers = self.validators(etag, mtime_ns, private)
        if self.not_modified(headers[0][1], mtime_ns):
            return self.send_body(b"", None, status=304, headers=headers, file=file)
        if (self.key is None and not private and len(body) >= 1024 and is_text(content_type)
                and "gzip" in self.headers.get("accept-encoding", "")):
            zipped = self.server.cache.get(gzip_key) if gzip_key else None
            if zipped is None:
                zipped = gzip.compress(body, 6, mtime=0)
                if gzip_key:
                    self.server.cache.put(gzip_key, zipped, len(zipped))
            body, headers = zipped, headers + [("Vary", "Accept-Encoding"), ("Content-Encoding", "gzip")]
        self.send_body(body, content_type, headers=headers, file=file)

    def reload_etag(self, etag):
        """Return the ETag a page's reload poll sends, or None for no poll: not with a key that
        opens nothing (each poll would count as one more wrong key)."""
        return self.validator(etag) if self.key is None or self.server.index.opens_any(self.key) else None

    def validator(self, etag):
        """Return the ETag as sent: answers to a keyed request carry the key in their links,
        so their ETag is the key's own (never the keyless page's)."""
        if self.key is None:
            return etag
        return f'{etag[:-1]}-{self.server.index.opener(self.key)[:6].hex()}"'

    def validators(self, etag, mtime_ns, private):
        """Return the cache headers, ETag first.  Answers to a keyed request are never stored."""
        store = "no-store" if private or self.key is not None else "no-cache"
        headers = [("ETag", self.validator(etag)), ("Cache-Control", store)]
        if mtime_ns is not None:
            headers.append(("Last-Modified", http_date(mtime_ns // 10**9)))
        return headers

    def not_modified(self, etag, mtime_ns):
        """True when the client's copy is current (If-None-Match, else If-Modified-Since)."""
        tags = self.headers.get("if-none-match")
        if tags is not None:
            strip = lambda tag: tag.strip()[2:] if tag.strip().startswith("W/") else tag.strip()
            return tags.strip() == "*" or strip(etag) in map(strip, tags.split(","))
        since = self.headers.get("if-modified-since")
        if since is None or mtime_ns is None:
            return False
        try:
            return mtime_ns // 10**9 <= email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, OverflowError):
            return False

    def send_body(self, body, content_type, status=200, headers=(), file=False):
        """Send status, headers and body (no body for HEAD: the headers are the same as for GET).
        A file from the folder (not a page of ours) is sandboxed: an SVG or HTML attachment
        opened on its own must not run script as this site.

        Builds the head in one string rather than through send_response/send_header: on
        the warm path those calls cost as much as everything else the server does."""
        self.log_request(status, len(body) if body else "-")
        head = [f"{self.protocol_version} {status} {self.responses[status][0]}\r\n"
                f"Server: {self.server_version}\r\nDate: {self.date_time_string()}\r\n"]
        if content_type:
            head.append(f"Content-Type: {content_type}\r\n")
        if body is not None and status != 304:
            head.append(f"Content-Length: {len(body)}\r\n")
        kind = "file" if file else "page" if content_type is not None and content_type.startswith("text/html") \
            else "other"
        head.append(self.server.security_headers[kind])
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
        if not PLATFORM.sendmsg or isinstance(self.connection, ssl.SSLSocket):  # TLS has no sendmsg
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
        return readable(folder.rpartition("/")[2] or os.path.basename(self.server.root) or "/")

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
                           folder=html.escape(self.folder_name(folder)), main=main,
                           script=script).encode("utf-8", "replace")  # a stray surrogate: '?', never a 500

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
            name, value = name.lower(), value.strip()
            # Repeated fields are one list (RFC 9110): an X-Forwarded-For sent twice is not half-read.
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
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

    def __init__(self, address, root, reload=True, cache_mb=64, max_note_mb=2, tls=None,
                 max_connections=256, client_timeout=10.0, log=None, clock=time.monotonic,
                 allowed_hosts=(), trusted_proxies=(), render_seconds=RENDER_SECONDS, fts=True):
        self.root = os.path.realpath(root)
        self.forbidden = own_files(tls)
        self.reload, self.note_limit, self.client_timeout = reload, int(max_note_mb * 2**20), client_timeout
        self.max_connections, self.connections, self.stopping = max_connections, 0, False
        self.per_client, self.client_share = collections.Counter(), max(1, max_connections // 4)
        self.allowed_hosts = {name.lower().rstrip(".") for name in allowed_hosts} | own_host_names()
        self.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self.unset_headers = {}  # proxy address -> the forwarding headers it was seen not to set
        self.hosts_seen = {}
        self.log, self.log_lines, self.log_lock = log or sys.stderr, collections.deque(maxlen=100000), threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self.write_log, daemon=True).start()
        script = f"'{RELOAD_HASH}'" if reload else "'none'"
        common = "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
        csp = f"Content-Security-Policy: {CSP.format(script=script)}\r\n"
        self.security_headers = {"page": common + csp, "other": common,
                                 "file": common + "Content-Security-Policy: sandbox; default-src 'none'\r\n"}
        self.cache = LRUCache(int(cache_mb * 2**20))
        self.renders, self.render_seconds = SingleFlight(os.cpu_count() or 1), render_seconds
        self.unrendered = LRUCache(4096)  # versions of notes too slow or too big to render: not tried again
        self.real_paths = {}
        self.index = NoteIndex(self.root, self.note_limit, self.forbidden, fts, busy=lambda: bool(self.in_flight))
        self.guard = KeyGuard(clock)
        self.in_flight, self.count_lock = set(), threading.Lock()
        self.salt = hashlib.blake2b(f"{__version__}{reload}{time.time_ns()}".encode(), digest_size=3).hexdigest()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        try:
            super().__init__(address, NoteHandler)
            if tls:  # the handshake happens in the connection's own thread, under its timeout
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*tls)
                self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            self.index.close()
            raise
        self.index.start()

    def host_allowed(self, host):
        """True for a Host header naming this server: an IP address, localhost, one of this
        machine's names or one given with --allowed-host.  No Host at all (HTTP/1.0 tools)
        is allowed: a browser always sends one."""
        if host is None:
            return True
        allowed = self.hosts_seen.get(host)
        if allowed is None:
            name = host_name(host)
            allowed = name in self.allowed_hosts or name == "localhost" or name.endswith(".localhost")
            if not allowed:
                try:
                    allowed = bool(ipaddress.ip_address(name))
                except ValueError:
                    pass
            if len(self.hosts_seen) > 1000:
                self.hosts_seen.clear()
            self.hosts_seen[host] = allowed
        return allowed

    def server_bind(self):
        if PLATFORM.exclusive_bind:
            self.allow_reuse_address = False
            if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        if self.address_family == socket.AF_INET6 and ipaddress.ip_address(self.server_address[0]).is_unspecified:
            # '::' means every address, IPv4 too: Windows (and some Linux set-ups) default to IPv6 only
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # http.server's calls getfqdn(), a DNS look-up that can stall start-up and leave the machine.
        super(ThreadingHTTPServer, self).server_bind()
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        # Each client gets a share of the connections, so that one address holding many idle
        # ones cannot shut out the rest; a trusted proxy speaks for many and has no share.
        client = self.share_of(client_address)
        with self.count_lock:
            busy = self.connections >= self.max_connections or \
                (client is not None and self.per_client[client] >= self.client_share)
            if not busy:
                self.connections += 1
                self.per_client[client] += 1
        if not busy:
            try:
                return super().process_request(request, client_address)
            except RuntimeError:  # no thread to be had: refuse like a full server
                self.release(client_address)
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
            self.release(client_address)

    def share_of(self, client_address):
        """Return whose share of the connections one counts in: its client's, or None for a
        trusted proxy (it speaks for many)."""
        if self.trusted_proxies and in_networks(client_address[0], self.trusted_proxies):
            return None
        return client_of(client_address[0])

    def release(self, client_address):
        client = self.share_of(client_address)
        with self.count_lock:
            self.connections -= 1
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]

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
        self.index.close()
        self.closed.set()

    def stop(self, grace=5.0):
        """Stop accepting, give requests in flight up to grace seconds, then close."""
        self.stopping = True
        self.server_close()
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.flush_log()


def own_files(tls):
    """Return the identities (device, inode) of the files this server must never serve."""
    identities = set()
    for path in (os.path.abspath(__file__),) + tuple(tls or ()):
        try:
            status = os.stat(path)
            identities.add((status.st_dev, status.st_ino))
        except OSError:
            pass
    return frozenset(identities)


def host_name(host):
    """Return the name in a Host header, without its port, brackets or final dot."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def own_host_names():
    """Return the names this machine goes by on a local network, from the system, not DNS."""
    name = socket.gethostname().lower().rstrip(".")
    short = name.partition(".")[0]
    return {n for n in (name, short, name + ".local", short + ".local") if n and n != ".local"}


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
    """Once the first indexing is done, print how many notes are public and private (never a key)."""
    while not server.index.complete.wait(1):
        if server.index.stopped.is_set():
            return
    public, private, locked = server.index.counts()
    print(f"  notes: {public} public, {private} private", file=out, flush=True)
    for rel in locked:
        print(f"  warning: {rel} has an empty password: it is locked for everyone", file=out, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage plus a message
        self.exit(2, f"mdserve: {message}\n")


def markdown_problem():
    """Return one line saying how to get a Python-Markdown this file can use, or None."""
    wanted = '"markdown>=%s"' % ".".join(map(str, MIN_MARKDOWN))  # double quotes: cmd.exe reads them too
    python = "py" if PLATFORM.name == "win32" else "python"  # what python.org's installer puts on PATH
    elsewhere = "or run it with: uv run mdserve.py, or pipx run mdserve.py)"
    if markdown is None:
        return (f"the markdown package is not installed. Get it with: {python} -m pip install {wanted} (or in a "
                f"venv; or apt install python3-markdown; {elsewhere}")
    if tuple(getattr(markdown, "__version_info__", (0, 0))[:2]) < MIN_MARKDOWN:
        return (f"markdown {getattr(markdown, '__version__', '?')} is too old. Get a newer one with: {python} -m pip "
                f"install --upgrade {wanted} (or in a venv; {elsewhere}")  # apt's may be the old one
    return None


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # a console that cannot show a name shows '?' instead
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    parser = _Parser(prog="mdserve", description="Serve a folder of markdown notes as a small website.")
    parser.add_argument("folder", nargs="?", default=".", metavar="DIR", help="folder of notes (default: .)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("-b", "--bind", default="0.0.0.0", metavar="ADDRESS",
                        help="address to listen on (default: all interfaces; 127.0.0.1 keeps it to this machine; "
                             ":: is every IPv6 and IPv4 address)")
    parser.add_argument("--no-reload", action="store_true", help="do not reload open pages when their note changes")
    parser.add_argument("--cache-mb", type=float, default=64, metavar="MB",
                        help="memory for rendered pages, in MB (default: 64)")
    parser.add_argument("--max-note-mb", type=float, default=2, metavar="MB",
                        help="larger notes are offered as raw text instead of rendered (default: 2)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--max-connections", type=int, default=256, metavar="N",
                        help="open connections at once, a quarter of them at most from one client; past "
                             "that, 503 (default: 256)")
    parser.add_argument("--timeout", type=float, default=10, metavar="SECONDS",
                        help="seconds a client may be idle or take to send a request (default: 10)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer to this host name (repeatable; IP addresses, localhost and this "
                             "machine's own names are always answered)")
    parser.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                        help="a reverse proxy at this address (or network) reports the client in "
                             "X-Forwarded-For or Forwarded (repeatable)")
    parser.add_argument("--version", action="version", version=f"mdserve {__version__}")
    args = parser.parse_args(argv)
    problem = markdown_problem()
    if problem:
        parser.exit(2, f"mdserve: {problem}\n")
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
    for flag, value, most in (("--cache-mb", args.cache_mb, 2**20), ("--max-note-mb", args.max_note_mb, 2**10),
                              ("--timeout", args.timeout, 86400), ("--max-connections", args.max_connections, 10**5)):
        if not 0 < value <= most:  # also false for nan
            parser.error(f"{flag} {value}: must be more than 0 and at most {most}")
    for tls_file in filter(None, (args.tls_cert, args.tls_key)):
        if not os.path.isfile(tls_file) or not os.access(tls_file, os.R_OK):
            parser.error(f"{tls_file}: no such file, or it cannot be read")
    for proxy in args.trusted_proxy:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            parser.error(f"--trusted-proxy {proxy}: not an IP address or network")
    for name in args.allowed_host:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            parser.error(f"--allowed-host {name}: not a host name")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        server = make_server(args.folder, args.bind, args.port, reload=not args.no_reload,
                             cache_mb=args.cache_mb, max_note_mb=args.max_note_mb, tls=tls,
                             max_connections=args.max_connections, client_timeout=args.timeout,
                             allowed_hosts=args.allowed_host, trusted_proxies=args.trusted_proxy)
    except ssl.SSLError as error:
        reason = str(error.reason or error)
        reason = ("the key is not the certificate's key" if "KEY_VALUES_MISMATCH" in reason else
                  "one of them is not a PEM file" if "PEM lib" in reason else reason)
        parser.error(f"cannot use the TLS certificate {args.tls_cert} with the key {args.tls_key}: {reason}")
    except OSError as error:
        parser.error(f"cannot listen on {args.bind}:{args.port}: {error.strerror or error}")
    for line in banner(server, args.bind, "https" if tls else "http"):
        print(line, flush=True)
    if tls and os.name == "posix" and os.stat(args.tls_key).st_mode & 0o077:
        print(f"  warning: {args.tls_key} can be read by other users of this machine (chmod 600 it)", flush=True)
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
    if threading.current_thread() is threading.main_thread():  # a second Ctrl+C does not cut the stop short
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
    server.stop()
    print("mdserve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
