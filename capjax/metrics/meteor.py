"""METEOR: the official METEOR 1.5 (Java), or NLTK's re-implementation.

METEOR (Denkowski & Lavie 2014) aligns candidate and reference words by
exact form, stem, WordNet synonym and paraphrase, and scores the alignment
with a fragmentation penalty. The COCO caption evaluation (Chen et al. 2015)
runs METEOR 1.5 from the jar that `pycocoevalcap` ships, and only that
jar's numbers are comparable with published ones. `java_meteor` runs the
same jar the same way (`-l en -norm`, one `SCORE` line per image, then one
`EVAL` line whose last answer is the corpus score).

Without Java, `nltk_meteor` is NLTK's METEOR with WordNet synonyms: a
different implementation (no paraphrase table, other parameters), so its
numbers are reported as METEOR_nltk and are only good for comparing runs
with each other. It needs WordNet, which `load_wordnet` finds offline: NLTK's
own corpus if it was downloaded, else the WordNet 3.0 files that
Debian/Ubuntu install with `wordnet-base` (/usr/share/wordnet). Those lack
the `lexnames` file NLTK's reader wants; it is written from the list in
WordNet's lexnames(5WN) manual page, next to a copy of the other files.
"""

import atexit
from collections.abc import Sequence
import functools
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any
import warnings

from capjax.errors import UserError

JAR_NAME = 'meteor-1.5.jar'
# Where distributions install the WordNet 3.0 database: Debian and Ubuntu's
# `wordnet-base`.
SYSTEM_WORDNET_DIRS = ('/usr/share/wordnet',)

_INSTALL_HINT = (
    'install Java for the official METEOR 1.5, or WordNet for NLTK\'s METEOR '
    '(`apt-get install wordnet-base` or `python -m nltk.downloader wordnet`), '
    'or leave METEOR out with --meteor=none')

# The WordNet database files NLTK's reader needs (besides `lexnames`).
_DICT_FILES = tuple(f'{kind}.{pos}' for kind in ('index', 'data')
                    for pos in ('noun', 'verb', 'adj', 'adv')) + tuple(
                        f'{pos}.exc' for pos in ('noun', 'verb', 'adj', 'adv'))
_OPTIONAL_FILES = ('lexnames', 'cntlist.rev', 'index.sense')

# The 45 lexicographer files of WordNet (lexnames(5WN)), in file-number
# order; the syntactic category number is implied by the prefix.
_LEXNAMES = (
    'adj.all', 'adj.pert', 'adv.all', 'noun.Tops', 'noun.act', 'noun.animal',
    'noun.artifact', 'noun.attribute', 'noun.body', 'noun.cognition',
    'noun.communication', 'noun.event', 'noun.feeling', 'noun.food',
    'noun.group', 'noun.location', 'noun.motive', 'noun.object',
    'noun.person', 'noun.phenomenon', 'noun.plant', 'noun.possession',
    'noun.process', 'noun.quantity', 'noun.relation', 'noun.shape',
    'noun.state', 'noun.substance', 'noun.time', 'verb.body', 'verb.change',
    'verb.cognition', 'verb.communication', 'verb.competition',
    'verb.consumption', 'verb.contact', 'verb.creation', 'verb.emotion',
    'verb.motion', 'verb.perception', 'verb.possession', 'verb.social',
    'verb.stative', 'verb.weather', 'adj.ppl')
_CATEGORY = {'noun': 1, 'verb': 2, 'adj': 3, 'adv': 4}


class MeteorUnavailable(UserError):
  """A METEOR implementation cannot run here (no Java, jar or WordNet)."""


# ---------------------------------------------------------------------------
# The official METEOR 1.5 jar.


def find_jar() -> str | None:
  """Path of the METEOR 1.5 jar shipped by `pycocoevalcap`, if installed."""
  spec = importlib.util.find_spec('pycocoevalcap')
  if spec is None or not spec.submodule_search_locations:
    return None
  for package_dir in spec.submodule_search_locations:
    jar = os.path.join(package_dir, 'meteor', JAR_NAME)
    if os.path.isfile(jar):
      return jar
  return None


@functools.cache
def java_runs(java: str = 'java') -> bool:
  """Whether `java -version` runs and succeeds."""
  if shutil.which(java) is None:
    return False
  try:
    return subprocess.run([java, '-version'], capture_output=True,
                          timeout=120, check=False).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def _protocol_text(text: str) -> str:
  # '|||' separates fields and a newline ends a request in the jar's
  # protocol; captions must contain neither.
  return ' '.join(text.replace('|||', ' ').split())


class _JavaMeteor:
  """One METEOR 1.5 process, spoken to over its stdin/stdout protocol."""

  def __init__(self, jar: str, java: str, max_memory: str):
    self._stderr = tempfile.TemporaryFile()
    try:
      # The jar finds its paraphrase table relative to its own folder.
      self._process = subprocess.Popen(
          [java, '-jar', f'-Xmx{max_memory}', os.path.basename(jar), '-', '-',
           '-stdio', '-l', 'en', '-norm'],
          cwd=os.path.dirname(os.path.abspath(jar)), stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, stderr=self._stderr)
    except OSError as e:
      self._stderr.close()
      raise MeteorUnavailable(f'METEOR: cannot start {java}: {e}') from None

  def request(self, line: str) -> None:
    try:
      self._process.stdin.write(line.encode('utf-8') + b'\n')
      self._process.stdin.flush()
    except OSError:  # BrokenPipeError: the process is gone.
      raise self._failure() from None

  def read_answer(self) -> str:
    """The next answer line: numbers (alignment stats, or one score)."""
    line = self._process.stdout.readline()
    try:
      if [float(x) for x in line.split()]:
        return line.decode('ascii').strip()
    except (ValueError, UnicodeDecodeError):
      pass
    raise self._failure(line)

  def _failure(self, line: bytes = b'') -> MeteorUnavailable:
    """The error to raise when the process died or answered nonsense."""
    self._end()
    self._stderr.seek(0)
    # The JVM writes some start-up errors to stdout.
    output = self._stderr.read() + line + self._process.stdout.read()
    lines = [l.strip() for l in output.decode('utf-8', 'replace').splitlines()
             if l.strip()]
    if lines:
      # The line naming the error (the JVM may print notes before it), and
      # the next one unless it is the Java stack trace.
      start = next((i for i, l in enumerate(lines)
                    if 'Error' in l or 'Exception' in l), len(lines) - 1)
      shown = [l for l in lines[start:start + 2] if not l.startswith('at ')]
      details = ': '.join(shown)[:300]
    else:
      details = f'it stopped with exit status {self._process.returncode}'
    return MeteorUnavailable(f'METEOR 1.5 (Java) failed: {details}')

  def _end(self) -> None:
    """Closes the input, so that the jar exits; kills it if it does not."""
    try:
      self._process.stdin.close()
    except OSError:  # It is gone already, with input unread.
      pass
    try:
      self._process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()

  def close(self) -> None:
    self._end()
    self._process.stdout.close()
    self._stderr.close()


def java_meteor(references: Sequence[Sequence[str]], candidates: Sequence[str],
                *, jar: str | None = None, java: str = 'java',
                max_memory: str = '2G') -> tuple[float, list[float]]:
  """The official METEOR 1.5 of tokenised captions.

  Args:
    references: per image, its reference captions (tokens joined by spaces).
    candidates: per image, the candidate caption, in the order of
      `references`.
    jar: the METEOR 1.5 jar; by default the one in `pycocoevalcap`.
    java: the Java launcher to run it with.
    max_memory: the JVM's heap limit (the jar loads a paraphrase table).

  Returns:
    (corpus score, per-image scores), in 0..1. The corpus score is the jar's
    own aggregate over all alignments, not the mean of the per-image scores.

  Raises:
    MeteorUnavailable: no jar, no Java, or the jar failed.
  """
  if len(references) != len(candidates):
    raise ValueError(f'{len(references)} reference sets for '
                     f'{len(candidates)} candidates')
  jar = jar or find_jar()
  if jar is None or not os.path.isfile(jar):
    raise MeteorUnavailable(
        f'METEOR: the {JAR_NAME} of pycocoevalcap was not found; '
        '`pip install pycocoevalcap`, or use --meteor=nltk')
  if not java_runs(java):
    raise MeteorUnavailable(
        f'METEOR: Java was not found (`{java} -version` does not run); '
        'install Java for the official METEOR 1.5, or use --meteor=nltk or '
        '--meteor=none')
  # By process id too: a forked child must not talk over its parent's pipe.
  key = (os.getpid(), os.path.abspath(jar), java, max_memory)
  with _processes_lock:
    kept = _processes.pop(key, None)
    try:
      score, per_image, process = _score(kept, references, candidates, jar,
                                         java, max_memory)
    except MeteorUnavailable:
      if kept is None:
        raise
      # The kept process died since (killed, say): once more, afresh.
      score, per_image, process = _score(None, references, candidates, jar,
                                         java, max_memory)
    # Kept for the next call: starting the JVM and loading the paraphrase
    # table take ~5 s of the ~6 s that scoring 1,000 captions takes, and a
    # job scores several splits (or, as a sidecar, every checkpoint). Each
    # EVAL only aggregates the stats it is sent, which pycocoevalcap's one
    # long-lived process relies on too.
    _processes[key] = process
  return score, per_image


def _score(process, references, candidates, jar, java, max_memory):
  """(corpus score, per-image scores, the process) from `process` or a new
  one; the process is closed if it fails."""
  process = process or _JavaMeteor(jar, java, max_memory)
  try:
    stats = []
    for refs, cand in zip(references, candidates):
      # SCORE ||| reference 1 ||| ... ||| reference k ||| candidate
      fields = [_protocol_text(r) for r in refs] + [_protocol_text(cand)]
      process.request(' ||| '.join(['SCORE'] + fields))
      stats.append(process.read_answer())
    # EVAL ||| stats 1 ||| ... ||| stats N: one score per image, then the
    # corpus score.
    process.request(' ||| '.join(['EVAL'] + stats))
    per_image = [float(process.read_answer()) for _ in stats]
    return float(process.read_answer()), per_image, process
  except BaseException:
    process.close()
    raise


# One idle METEOR process per (pid, jar, java, heap), closed at exit.
_processes: dict[tuple[int, str, str, str], _JavaMeteor] = {}
_processes_lock = threading.Lock()


@atexit.register
def _close_processes() -> None:
  with _processes_lock:
    for key in [k for k in _processes if k[0] == os.getpid()]:
      _processes.pop(key).close()


# ---------------------------------------------------------------------------
# NLTK's METEOR and an offline WordNet for it.


@functools.cache
def _reader_class() -> type[Any]:
  from nltk.corpus.reader import wordnet  # pylint: disable=g-import-not-at-top

  class EnglishWordNet(wordnet.WordNetCorpusReader):
    """WordNet without the multilingual (OMW) mapping.

    NLTK maps a WordNet to its own downloaded one for OMW's translations;
    METEOR uses no translations, and that mapping would look for NLTK's
    download, which is what is missing.
    """

    def map_wn(self, version: str = 'wordnet'):
      del version
      return None

  return EnglishWordNet


def _authorise(directory: str) -> None:
  """Lets NLTK read files under `directory`.

  NLTK only opens corpus files below its data path (`nltk.data.path`).
  """
  import nltk  # pylint: disable=g-import-not-at-top
  if directory not in nltk.data.path:
    nltk.data.path.append(directory)


def _make_reader(root: Any):
  with warnings.catch_warnings():
    # "The multilingual functions are not available": expected, see above.
    warnings.simplefilter('ignore')
    return _reader_class()(root, None)


def _lexnames_text() -> str:
  return ''.join(f'{i:02d}\t{name}\t{_CATEGORY[name.split(".")[0]]}\n'
                 for i, name in enumerate(_LEXNAMES))


def _stage(source: str, parent: str | None) -> str:
  """A private copy of the WordNet files in `source`, with a `lexnames`.

  A copy, not links: NLTK refuses to open symlinks or hard links that lead
  out of its data path. The copy is removed when the process exits.
  """
  root = tempfile.mkdtemp(prefix='capjax-wordnet-', dir=parent)
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  for name in _DICT_FILES + _OPTIONAL_FILES:
    path = os.path.join(source, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(root, name))
  if not os.path.exists(os.path.join(root, 'lexnames')):
    with open(os.path.join(root, 'lexnames'), 'w', encoding='utf-8') as f:
      f.write(_lexnames_text())
  return root


def load_wordnet(nltk_data_dirs: Sequence[str] | None = None,
                 system_dirs: Sequence[str] = SYSTEM_WORDNET_DIRS,
                 staging_dir: str | None = None):
  """An NLTK WordNet reader, from local files only.

  Args:
    nltk_data_dirs: NLTK data folders to look in for `corpora/wordnet` (a
      folder or NLTK's zip); by default `nltk.data.path`.
    system_dirs: folders holding the WordNet database files (`data.noun`,
      `index.noun`, ...), tried after the NLTK data folders.
    staging_dir: where the copy of a system WordNet goes (in a fresh
      subfolder, removed at exit); by default the system's temp folder.

  Returns:
    A `nltk.corpus.reader.WordNetCorpusReader`. Loaded once per process for
    the same arguments.

  Raises:
    MeteorUnavailable: no usable WordNet in any of those places.
  """
  if nltk_data_dirs is None:
    import nltk  # pylint: disable=g-import-not-at-top
    nltk_data_dirs = [p for p in nltk.data.path if isinstance(p, str)]
  return _load_wordnet(tuple(nltk_data_dirs), tuple(system_dirs), staging_dir)


def _one_line(error: Exception) -> str:
  # NLTK's messages span lines; a UserError is printed as one.
  return f'{type(error).__name__}: {" ".join(str(error).split())}'[:300]


@functools.cache
def _load_wordnet(nltk_data_dirs: tuple[str, ...], system_dirs: tuple[str, ...],
                  staging_dir: str | None):
  import nltk  # pylint: disable=g-import-not-at-top
  problems = []
  for data_dir in nltk_data_dirs:
    for resource in ('corpora/wordnet', 'corpora/wordnet.zip/wordnet/'):
      path = os.path.join(data_dir, *resource.split('/')[:2])
      if not os.path.exists(path):
        continue
      try:
        _authorise(data_dir)
        return _make_reader(nltk.data.find(resource, paths=[data_dir]))
      except Exception as e:  # pylint: disable=broad-except
        # Broken data can fail anywhere in NLTK's parser; say where and go on.
        problems.append(f'{path}: {_one_line(e)}')
  for source in system_dirs:
    missing = [n for n in _DICT_FILES
               if not os.path.isfile(os.path.join(source, n))]
    if missing:
      if os.path.isdir(source):
        problems.append(f'{source}: no {", ".join(missing)}')
      continue
    try:
      root = _stage(source, staging_dir)
      _authorise(root)
      return _make_reader(root)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'{source}: {_one_line(e)}')
  searched = [os.path.join(d, 'corpora', 'wordnet') for d in nltk_data_dirs]
  searched += list(system_dirs)
  raise MeteorUnavailable(
      'METEOR: no WordNet for NLTK\'s METEOR (looked in '
      f'{", ".join(searched) or "no folders"}'
      + (f'; unusable: {"; ".join(problems)}' if problems else '')
      + f'); {_INSTALL_HINT}')


def nltk_meteor(references: Sequence[Sequence[Sequence[str]]],
                candidates: Sequence[Sequence[str]],
                wordnet=None) -> tuple[float, list[float]]:
  """NLTK's METEOR of token lists: (mean over images, per-image scores).

  Args:
    references: per image, its reference captions as token lists.
    candidates: per image, the candidate as a token list.
    wordnet: a WordNet reader; by default `load_wordnet()`.

  Raises:
    MeteorUnavailable: no WordNet was found.
  """
  # pylint: disable-next=g-import-not-at-top
  from nltk.translate.meteor_score import meteor_score
  if len(references) != len(candidates):
    raise ValueError(f'{len(references)} reference sets for '
                     f'{len(candidates)} candidates')
  wordnet = wordnet if wordnet is not None else load_wordnet()
  scores = [meteor_score([list(r) for r in refs], list(cand), wordnet=wordnet)
            for refs, cand in zip(references, candidates)]
  return (sum(scores) / len(scores) if scores else 0.0), scores
