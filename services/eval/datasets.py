"""Two small retrieval test collections in BEIR layout, built on this machine from the running
Python's own documentation: NOT standard datasets.

- ``stdlib-modules``: the documentation of :data:`MODULES` (134 standard-library modules) as the
  demo corpus renders it (:mod:`agentmesh.services.retrieval.corpus`), one document per module;
  :data:`QUERIES`, 90 developer questions in three styles: natural-language questions,
  paraphrases that share few words with the answer, and identifier lookups (``Popen
  communicate timeout``).
- ``python-reference``: the 79 topics of the Python language reference that ``pydoc`` ships
  (``pydoc_data.topics``), one document per topic; :data:`REFERENCE_QUERIES`, 60 questions about
  the language.

The queries were written by the AgentMesh authors and judged against the documents that answer
them (grade 2: the document a developer needs; 1: one that also helps). The corpora are the same
on every machine with the same Python version.

They exist because no standard BEIR dataset can be downloaded where AgentMesh is built; they
were used to choose the retrieval defaults (``services/retrieval/README.md``). Figures measured
on them say how the system ranks Python documentation for these queries, nothing more general.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentmesh.services.retrieval.corpus import stdlib_documents

#: (query, {module: grade}). Grade 2: the module that answers; 1: a module that also helps.
QUERIES: tuple[tuple[str, dict[str, int]], ...] = (
    ("How do I parse a JSON string into a Python dict?", {"json": 2}),
    ("serialize an object to a byte stream and restore it later", {"pickle": 2, "marshal": 1, "shelve": 1}),
    ("run an external command and capture its standard output", {"subprocess": 2}),
    ("create a temporary directory that is removed automatically", {"tempfile": 2}),
    ("copy a whole directory tree recursively", {"shutil": 2}),
    ("find every file whose name matches *.txt in a folder", {"glob": 2, "fnmatch": 1, "pathlib": 1}),
    ("split a URL into scheme, network location and path", {"urllib.parse": 2}),
    ("percent-encode the parameters of a query string", {"urllib.parse": 2}),
    ("read a CSV file whose first row holds the column names", {"csv": 2}),
    ("priority queue that always pops the smallest item", {"heapq": 2, "queue": 1}),
    ("insert an element into a sorted list and keep it sorted", {"bisect": 2}),
    ("count how many times each word occurs in a text", {"collections": 2}),
    ("tuple subclass whose fields are accessible by attribute name", {"collections": 2, "typing": 1}),
    ("dictionary that remembers insertion order and can move a key to the end", {"collections": 2}),
    ("remember the results of an expensive function so repeated calls are fast", {"functools": 2}),
    ("freeze some arguments of a function to make a new callable", {"functools": 2}),
    ("all pairs of elements from a list without repetition", {"itertools": 2}),
    ("group consecutive items that share the same key", {"itertools": 2}),
    ("cartesian product of several iterables", {"itertools": 2}),
    ("arithmetic on money amounts without binary floating point rounding errors", {"decimal": 2, "fractions": 1}),
    ("exact rational numbers with a numerator and a denominator", {"fractions": 2}),
    ("generate an unguessable token for a password reset link", {"secrets": 2}),
    ("shuffle the items of a list in place at random", {"random": 2}),
    ("median and standard deviation of a sample of numbers", {"statistics": 2}),
    ("compute the SHA-256 digest of a file", {"hashlib": 2}),
    ("check that a message was signed with a shared secret key", {"hmac": 2}),
    ("encode binary data as printable ASCII text for an email or URL", {"base64": 2, "binascii": 1}),
    ("compress a file the way the gzip program does", {"gzip": 2, "zlib": 1}),
    ("put several files into a zip archive", {"zipfile": 2}),
    ("extract the members of a .tar.gz archive", {"tarfile": 2}),
    ("current local time in a time zone such as Europe/Paris", {"zoneinfo": 2, "datetime": 1}),
    ("number of days between two dates", {"datetime": 2}),
    ("format a point in time as text with strftime directives", {"datetime": 2, "time": 1}),
    ("measure how long a small snippet of code takes to run", {"timeit": 2}),
    ("find out which functions of my program take the most time", {"cProfile": 2, "profile": 1, "pstats": 1}),
    ("run many blocking calls in parallel with a pool of threads", {"concurrent.futures": 2, "threading": 1}),
    ("protect shared data from being modified by two threads at once", {"threading": 2}),
    ("use all CPU cores by starting worker processes", {"multiprocessing": 2, "concurrent.futures": 1}),
    ("write a TCP server with coroutines and an event loop", {"asyncio": 2}),
    ("wait for several coroutines at once and collect their results", {"asyncio": 2}),
    ("thread-safe FIFO queue between a producer and consumers", {"queue": 2}),
    ("write log messages with a timestamp and a severity level to a file", {"logging": 2}),
    ("silence a particular deprecation warning", {"warnings": 2}),
    ("define command line options and parse the program's arguments", {"argparse": 2, "getopt": 1, "optparse": 1}),
    ("read an INI style configuration file with sections", {"configparser": 2}),
    ("load settings from a TOML file", {"tomllib": 2}),
    ("check whether a string looks like an email address using a pattern", {"re": 2}),
    ("substitute every match of a pattern in a string", {"re": 2}),
    ("break a long paragraph into lines of at most 70 characters", {"textwrap": 2}),
    ("show the differences between two versions of a text file", {"difflib": 2, "filecmp": 1}),
    ("join path components and expand the user's home directory", {"os.path": 2, "pathlib": 1}),
    ("object-oriented filesystem paths with methods to read and write files", {"pathlib": 2}),
    ("read an environment variable of the process", {"os": 2}),
    ("open a SQLite database file and run an SQL query", {"sqlite3": 2}),
    ("dictionary that persists on disk between runs", {"shelve": 2, "dbm": 1}),
    ("send an email through an SMTP server", {"smtplib": 2, "email": 1}),
    ("download a web page with an HTTP GET request", {"urllib.request": 2, "http.client": 1}),
    ("connect a network socket and send bytes", {"socket": 2}),
    ("encrypt a socket connection with TLS and verify the certificate", {"ssl": 2}),
    ("generate a random unique identifier", {"uuid": 2}),
    ("base class that forces subclasses to implement some methods", {"abc": 2}),
    ("class that gets __init__ and __repr__ generated from its annotated fields", {"dataclasses": 2}),
    ("set of named constant values", {"enum": 2}),
    ("annotate a parameter that may be a list of strings or None", {"typing": 2}),
    ("turn a generator function with a yield into a with statement helper", {"contextlib": 2}),
    ("copy a nested structure so that changes do not affect the original", {"copy": 2}),
    ("escape < > and & before inserting text into a web page", {"html": 2}),
    ("parse an XML document and iterate over its elements", {"xml.etree.ElementTree": 2}),
    ("pack integers into bytes in big-endian order", {"struct": 2}),
    ("check whether an IP address belongs to a subnet", {"ipaddress": 2}),
    ("guess the content type of a file from its extension", {"mimetypes": 2}),
    ("print the stack trace of the exception being handled", {"traceback": 2}),
    ("get the parameters and default values of a function at run time", {"inspect": 2}),
    ("reference an object without keeping it alive", {"weakref": 2}),
    ("import a module whose name is only known as a string", {"importlib": 2}),
    ("run cleanup code when the interpreter exits", {"atexit": 2}),
    ("look at the bytecode instructions of a function", {"dis": 2}),
    ("write test cases with assertions and run them", {"unittest": 2, "doctest": 1}),
    ("stop the program at a breakpoint and step through the code", {"pdb": 2}),
    ("find which lines allocate the most memory", {"tracemalloc": 2}),
    ("read lines from all files named on the command line or from stdin", {"fileinput": 2}),
    ("split a shell command line into words respecting quotes", {"shlex": 2}),
    ("print the calendar of a month as text", {"calendar": 2}),
    ("lru_cache maxsize typed", {"functools": 2}),
    ("ThreadPoolExecutor submit as_completed", {"concurrent.futures": 2}),
    ("defaultdict default_factory", {"collections": 2}),
    ("Popen communicate timeout", {"subprocess": 2}),
    ("walk a directory tree top-down listing dirpath dirnames filenames", {"os": 2}),
    ("json.dumps indent sort_keys", {"json": 2}),
    ("re.compile IGNORECASE MULTILINE flags", {"re": 2}),
)

_DISTRACTORS = (
    "string", "sys", "io", "codecs", "signal", "select", "selectors", "socketserver", "http.server", "array",
    "operator", "math", "cmath", "numbers", "pprint", "reprlib", "keyword", "tokenize", "ast", "types", "gc",
    "platform", "locale", "gettext", "getpass", "webbrowser", "wave", "lzma", "bz2", "quopri", "imaplib",
    "poplib", "ftplib", "mailbox", "sched", "graphlib", "stat", "errno", "pty", "tty", "syslog", "email.message",
    "code", "runpy", "zipimport", "linecache",
)

#: Every module a query judges, then the distractors: 134 documents.
MODULES: tuple[str, ...] = tuple(dict.fromkeys([m for _, judged in QUERIES for m in judged] + list(_DISTRACTORS)))


REFERENCE_QUERIES: tuple[tuple[str, dict[str, int]], ...] = (
    ("what happens when an assert statement fails and how are assertions disabled", {"assert": 2}),
    ("unpack a tuple into several variables in one assignment", {"assignment": 2}),
    ("async for and async with statements in a coroutine", {"async": 2}),
    ("name mangling of private attributes that start with two underscores", {"atom-identifiers": 2, "id-classes": 1}),
    ("method called when normal attribute lookup fails", {"attribute-access": 2}),
    ("x += 1 and the other in-place operators", {"augassign": 2}),
    ("suspend a coroutine until an awaitable completes", {"await": 2}),
    ("operator precedence from lowest to highest", {"operator-summary": 2}),
    ("bitwise and, or and exclusive or of integers", {"bitwise": 2}),
    ("the object returned by functions that return nothing", {"bltin-null-object": 2, "return": 1}),
    ("the Ellipsis object written as three dots", {"bltin-ellipsis-object": 2}),
    ("leave a loop before it is finished", {"break": 2}),
    ("skip the rest of the loop body and start the next iteration", {"continue": 2}),
    ("class definition with base classes and a metaclass keyword", {"class": 2}),
    ("chained comparisons such as a < b < c", {"comparisons": 2}),
    ("difference between is and == identity versus equality", {"comparisons": 2}),
    ("__enter__ and __exit__ methods of an object used in a with statement", {"context-managers": 2, "with": 1}),
    ("special methods __init__ __repr__ __eq__ __hash__ to customize a class", {"customization": 2}),
    ("delete a name binding or an item of a list", {"del": 2}),
    ("dictionary methods get, setdefault, update and view objects", {"typesmapping": 2, "dict": 1}),
    ("dictionary display and dict comprehension syntax", {"dict": 2}),
    ("how exceptions propagate and are handled", {"exceptions": 2, "try": 1}),
    ("else clause of a for loop runs when the loop was not broken", {"for": 2, "else": 1}),
    ("format specification mini-language width precision alignment", {"formatstrings": 2}),
    ("formatted string literals with expressions inside braces", {"strings": 2, "formatstrings": 1}),
    ("default parameter values are evaluated once when the function is defined", {"function": 2}),
    ("assign to a module-level variable from inside a function", {"global": 2}),
    ("rebind a variable of the enclosing function scope", {"nonlocal": 2}),
    ("relative import of a submodule from a package", {"import": 2}),
    ("membership test with the in operator", {"in": 2, "comparisons": 1}),
    ("integer literals in hexadecimal, octal and binary with underscores", {"integers": 2}),
    ("syntax of floating point literals with an exponent", {"floating": 2}),
    ("imaginary literals and complex numbers", {"imaginary": 2}),
    ("small anonymous function written as a single expression", {"lambda": 2}),
    ("list display and list comprehension syntax", {"lists": 2}),
    ("how names are resolved in nested scopes and free variables", {"naming": 2}),
    ("raise a new exception while keeping the original one as its cause", {"raise": 2}),
    ("leave a function and give back a value to the caller", {"return": 2}),
    ("slice with a step to reverse a sequence", {"slicings": 2, "typesseq": 1}),
    ("string methods split, join, strip and replace", {"string-methods": 2}),
    ("which objects are considered false in an if condition", {"truth": 2}),
    ("try statement with except, else and finally clauses", {"try": 2}),
    ("repeat a block as long as a condition is true", {"while": 2}),
    ("generator functions, yield expressions and send()", {"yield": 2}),
    ("mutable sequence operations append, extend, insert and pop", {"typesseq-mutable": 2}),
    ("emulate a container type with __len__ and __getitem__", {"sequence-types": 2}),
    ("operator overloading with __add__ and the reflected __radd__", {"numeric-types": 2}),
    ("floor division and modulo with negative numbers", {"binary": 2}),
    ("power operator with a negative exponent", {"power": 2}),
    ("shift the bits of an integer left or right", {"shifting": 2}),
    ("unary minus and bitwise inversion", {"unary": 2}),
    ("a statement that does nothing as a placeholder", {"pass": 2}),
    ("if, elif and else statement", {"if": 2}),
    ("special attributes __dict__, __class__ and __name__", {"specialattrs": 2}),
    ("every object has an identity, a type and a value", {"objects": 2}),
    ("the standard type hierarchy of callable types, modules and classes", {"types": 2, "callable-types": 1}),
    ("exec and eval interacting with nested scopes", {"dynamic-features": 2}),
    ("call a function unpacking a list with * and a dict with **", {"calls": 2}),
    ("subscription of a sequence or a mapping with square brackets", {"subscriptions": 2}),
    ("bound method objects and their __self__ and __func__ attributes", {"typesmethods": 2}),
)


def _documents(name: str) -> tuple[list[dict], tuple[tuple[str, dict[str, int]], ...]]:
    if name == "stdlib-modules":
        docs = [{"_id": d.metadata["module"], "title": d.title, "text": d.text, "metadata": {"source": d.source}}
                for d in stdlib_documents(list(MODULES))]
        return docs, QUERIES
    if name == "python-reference":
        from pydoc_data.topics import topics  # noqa: PLC0415

        docs = []
        for topic in sorted(topics):
            text = topics[topic].strip()
            docs.append({"_id": topic, "title": text.split("\n", 1)[0].strip(), "text": text})
        return docs, REFERENCE_QUERIES
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


#: The datasets :func:`write` can build.
DATASETS = ("stdlib-modules", "python-reference")


def write(name: str, directory: str | Path) -> Path:
    """Write dataset ``name`` (one of :data:`DATASETS`) as ``corpus.jsonl``, ``queries.jsonl``
    and ``qrels/test.tsv`` into ``directory`` (created); returns it. Raises ``ValueError`` for
    an unknown name."""
    docs, queries = _documents(name)
    root = Path(directory)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for i, (text, _) in enumerate(queries, 1):
            fh.write(json.dumps({"_id": f"q{i}", "text": text}) + "\n")
    with (root / "qrels" / "test.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for i, (_, judged) in enumerate(queries, 1):
            for doc_id, grade in judged.items():
                fh.write(f"q{i}\t{doc_id}\t{grade}\n")
    return root
