"""capjax.metrics: hand-computed cases, and agreement with pycocoevalcap.

The agreement tests run the official scorers of the COCO caption evaluation
(`pycocoevalcap`) on a generated caption set, after the official Java
PTBTokenizer, and capjax's metrics on the raw captions: every number must
agree. They are skipped, with the reason, where Java or pycocoevalcap is
missing. The official METEOR comparison starts the METEOR jar twice (about
10 s each), so it is marked slow.
"""

import gzip
import math
import os
import random
import re
import shutil
import sys
import warnings

import pytest

from capjax import metrics
from capjax.data import tokenizer
from capjax.errors import UserError
from capjax.metrics import bleu
from capjax.metrics import cider
from capjax.metrics import meteor
from capjax.metrics import rouge


def _t(text: str) -> list[str]:
  return text.split()


# ---------------------------------------------------------------------------
# BLEU


def test_bleu_of_a_candidate_equal_to_a_reference_is_one():
  scores = bleu.corpus_bleu([[_t('a man rides a horse'), _t('a dog')]],
                            [_t('a man rides a horse')])
  assert scores == pytest.approx([1.0] * 4, abs=1e-9)


def test_bleu_clips_repeated_words_by_the_largest_reference_count():
  # 'the' appears at most twice in one reference: 2 of 4 unigrams count.
  scores = bleu.corpus_bleu([[_t('the cat the hat'), _t('the dog')]],
                            [_t('the the the the')])
  assert scores[0] == pytest.approx(2 / 4)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
  refs = [[_t('a cat sat'), _t('a cat sat on the mat')]]
  # Closest reference length 3 for a 2-word candidate: exp(1 - 3/2).
  assert bleu.corpus_bleu(refs, [_t('a cat')])[0] == pytest.approx(
      math.exp(1 - 3 / 2))
  # A 3-word candidate, 3-word reference: no penalty.
  assert bleu.corpus_bleu(refs, [_t('a cat sat')])[0] == pytest.approx(1.0)


def test_bleu_length_tie_goes_to_the_shorter_reference():
  # Lengths 2 and 4 are both 1 away from 3; with 2, no penalty.
  scores = bleu.corpus_bleu([[_t('x y'), _t('a b c d')]], [_t('a b c')])
  assert scores[0] == pytest.approx(1.0)


def test_bleu_short_candidates_add_nothing_to_longer_ngram_counts():
  # The official scorer counts max(0, len - n + 1) candidate n-grams; NLTK's
  # corpus_bleu would count one bigram for 'a' and give BLEU-2 = sqrt(2/3).
  refs = [[_t('a b c')], [_t('a')]]
  scores = bleu.corpus_bleu(refs, [_t('a b c'), _t('a')])
  assert scores[1] == pytest.approx(1.0)


def test_bleu_without_matches_is_near_zero_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    scores = bleu.corpus_bleu([[_t('a b c d e')]], [_t('v w x y z')])
    empty = bleu.corpus_bleu([[_t('a b c d e')]], [[]])
  assert all(0 <= s < 1e-3 for s in scores + empty)


# ---------------------------------------------------------------------------
# ROUGE-L


def _lcs_by_subsets(a, b):
  """The longest common subsequence by trying every subsequence of `a`."""
  best = 0
  for mask in range(1 << len(a)):
    sub = [x for i, x in enumerate(a) if mask >> i & 1]
    it = iter(b)
    if all(x in it for x in sub):  # `sub` is a subsequence of `b`.
      best = max(best, len(sub))
  return best


def test_lcs_length_is_the_longest_common_subsequence():
  rng = random.Random(0)
  for _ in range(300):
    a = rng.choices('abc', k=rng.randint(0, 8))
    b = rng.choices('abc', k=rng.randint(0, 8))
    assert rouge.lcs_length(a, b) == _lcs_by_subsets(a, b), (a, b)


def test_rouge_l_of_identical_captions_is_one():
  assert rouge.rouge_l([_t('a b c')], _t('a b c')) == pytest.approx(1.0)


def test_rouge_l_of_a_known_lcs():
  # LCS('a b c d', 'a x c y d z') = 'a c d': P = 3/4, R = 3/6.
  p, r, beta2 = 3 / 4, 3 / 6, 1.2**2
  assert rouge.rouge_l([_t('a x c y d z')], _t('a b c d')) == pytest.approx(
      (1 + beta2) * p * r / (r + beta2 * p))


def test_rouge_l_takes_best_precision_and_recall_over_references():
  # Precision 1 from the long reference, recall 1 from the short one.
  assert rouge.rouge_l([_t('a b'), _t('a b c d e f g h')],
                       _t('a b c d')) == pytest.approx(1.0)


def test_rouge_l_without_overlap_or_candidate_is_zero():
  assert rouge.rouge_l([_t('a b')], _t('c d')) == 0.0
  assert rouge.rouge_l([_t('a b')], []) == 0.0


# ---------------------------------------------------------------------------
# CIDEr-D


def test_cider_of_a_candidate_equal_to_all_its_references_is_ten():
  # Every n-gram belongs to one image of two: idf log 2, cosine 1 for n=1..4.
  refs = [[_t('a man rides a horse')] * 5, [_t('two dogs play in snow')] * 5]
  scores = cider.per_image(refs, [_t('a man rides a horse'),
                                  _t('two dogs play in snow')])
  assert scores == pytest.approx([10.0, 10.0])


def test_cider_ignores_ngrams_every_image_uses():
  refs = [[_t('a photo of a cat')], [_t('a photo of a dog')]]
  assert cider.per_image(refs, [_t('a photo of a'), _t('a photo of a')]) == (
      pytest.approx([0.0, 0.0]))


def test_cider_of_one_image_is_zero():
  # N = 1: log(N) - log(df) is 0 for every n-gram.
  assert cider.corpus_cider([[_t('a b c')]], [_t('a b c')]) == 0.0


def test_cider_cosine_and_length_penalty_by_hand():
  # Unigrams only. Image 0: candidate {a}, reference {a, b}, all with
  # weight log 2; cosine 1 / sqrt(2); lengths 1 and 2.
  scorer = cider.CiderD([[_t('a b')], [_t('c d')]], max_n=1)
  assert scorer.score(_t('a'), 0) == pytest.approx(
      10 / math.sqrt(2) * math.exp(-1 / (2 * 6.0**2)))


def test_cider_clips_repeated_words():
  # Candidate {a: 4 log 2} against {a: log 2, b: log 2}: the min keeps
  # log 2, so cosine log2^2 / (4 log2 * sqrt(2) log2).
  scorer = cider.CiderD([[_t('a b')], [_t('c d')]], max_n=1)
  assert scorer.score(_t('a a a a'), 0) == pytest.approx(
      10 / (4 * math.sqrt(2)) * math.exp(-(4 - 2)**2 / (2 * 6.0**2)))


def test_cider_scorer_takes_candidates_for_any_images():
  refs = [[_t('a man rides a horse'), _t('a person on a horse')],
          [_t('two dogs play'), _t('dogs in the snow')]]
  cands = [_t('a man on a horse'), _t('two dogs in snow')]
  scorer = cider.CiderD(refs)
  expected = cider.per_image(refs, cands)
  assert scorer.per_image(cands[::-1], images=[1, 0]) == pytest.approx(
      expected[::-1])
  with pytest.raises(ValueError, match='pass `images`'):
    scorer.per_image(cands[:1])


# ---------------------------------------------------------------------------
# score()


def test_score_returns_the_official_metric_names():
  refs = {1: ['A man riding a horse.', 'A person on a horse.'],
          2: ['Two dogs play in the snow.', 'Dogs in the snow!']}
  result = metrics.score(refs, {1: 'A man on a horse', 2: 'Dogs playing.'},
                         meteor='none')
  assert list(result) == ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L',
                          'CIDEr']
  assert all(isinstance(v, float) for v in result.values())
  # Tokenisation drops case and punctuation: identical after it.
  same = metrics.score(refs, {1: 'a PERSON on a horse', 2: 'dogs in the snow'},
                       meteor='none')
  assert same['BLEU-4'] == pytest.approx(1.0)
  assert same['ROUGE-L'] == pytest.approx(1.0)


def test_score_refuses_mismatched_ids_and_bad_modes():
  with pytest.raises(ValueError, match='only in candidates'):
    metrics.score({1: ['a b']}, {1: 'a', 2: 'b'}, meteor='none')
  with pytest.raises(ValueError, match='no images'):
    metrics.score({}, {}, meteor='none')
  with pytest.raises(ValueError, match='list of reference captions'):
    metrics.score({1: 'a b'}, {1: 'a'}, meteor='none')
  with pytest.raises(ValueError, match='meteor must be one of'):
    metrics.score({1: ['a b']}, {1: 'a'}, meteor='yes')


def _unavailable(*args, **kwargs):
  del args, kwargs
  raise meteor.MeteorUnavailable('METEOR: not here')


def test_auto_meteor_falls_back_and_finally_leaves_meteor_out(monkeypatch,
                                                               caplog):
  monkeypatch.setattr(meteor, 'java_meteor', _unavailable)
  monkeypatch.setattr(meteor, 'load_wordnet', _unavailable)
  result = metrics.score({1: ['a b']}, {1: 'a b'}, meteor='auto')
  assert not any(k.startswith('METEOR') for k in result)
  assert 'METEOR is left out' in caplog.text
  # Asked for explicitly, a missing implementation is an error.
  for mode in ('java', 'nltk'):
    with pytest.raises(UserError, match='not here'):
      metrics.score({1: ['a b']}, {1: 'a b'}, meteor=mode)


# ---------------------------------------------------------------------------
# Agreement with pycocoevalcap on edge cases (pure Python: no Java needed).


def _official_scores(gts, res):
  """pycocoevalcap's BLEU-1..4, ROUGE-L, CIDEr of tokenised captions."""
  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  # pylint: enable=g-import-not-at-top
  scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
  result = {f'BLEU-{n}': s for n, s in enumerate(scores, 1)}
  result['ROUGE-L'], _ = Rouge().compute_score(gts, res)
  result['CIDEr'], _ = Cider().compute_score(gts, res)
  return result


def _random_corpus(rng: random.Random, num_images: int, max_len: int):
  vocab = ['a', 'b', 'c', 'd', 'e', 'f']
  def caption(min_len):
    length = rng.randint(min_len, max_len)
    return ' '.join(rng.choice(vocab) for _ in range(length))
  # References of at least one word: the official CIDEr fails on a corpus
  # whose references are all empty (the explicit cases have empty ones).
  refs = {i: [caption(1) for _ in range(rng.randint(1, 5))]
          for i in range(num_images)}
  return refs, {i: caption(0) for i in refs}


def test_edge_cases_match_pycocoevalcap():
  pytest.importorskip('pycocoevalcap', reason='pycocoevalcap is not '
                      'installed: nothing to compare with')
  rng = random.Random(1)
  corpora = [
      ({1: ['a b c d']}, {1: 'a b c d'}),  # one image
      ({1: ['a b c d'], 2: ['e f']}, {1: 'x y z w', 2: 'q'}),  # no matches
      ({1: ['a b c'], 2: ['a b']}, {1: 'a b', 2: 'a'}),  # all too short
      ({1: ['a b c', ''], 2: ['c d']}, {1: '', 2: 'c d'}),  # empty captions
      ({1: [''], 2: ['a']}, {1: '', 2: ''}),
  ]
  corpora += [_random_corpus(rng, n, max_len)
              for n in (1, 2, 3, 5, 20, 40) for max_len in (2, 5, 12)]
  for refs, cands in corpora:
    expected = _official_scores(refs, {i: [c] for i, c in cands.items()})
    ours = metrics.score(refs, cands, meteor='none', tokenized=True)
    for name, value in expected.items():
      assert ours[name] == pytest.approx(value, abs=1e-9), (name, refs, cands)


# ---------------------------------------------------------------------------
# Agreement with pycocoevalcap on realistic captions (needs Java for the
# official tokenizer).

_SUBJECTS = ['man', 'woman', 'dog', 'cat', 'child', 'boy', 'girl', 'giraffe',
             'zebra', 'bus', 'train', 'plane', 'skier', 'surfer', 'horse',
             'elephant', 'bird', 'teddy bear', 'pizza', 'motorcycle',
             'baseball player', 'sheep', 'cow', 'fire hydrant']
_ADJECTIVES = ['small', 'large', 'red', 'blue', 'black-and-white', 'old',
               'young', 'happy', 'two-story', 'brown', 'tall', 'wet',
               'well-dressed', 'half-eaten']
_VERBS = ['riding', 'sitting on', 'standing next to', 'eating', 'holding',
          'looking at', 'walking down', 'flying over', 'playing with',
          'parked near', 'jumping over', 'lying on', 'cutting']
_OBJECTS = ['street', 'beach', 'table', 'field', 'skateboard', 'frisbee',
            'kite', 'wave', 'runway', 'bench', 'sidewalk', 'snow', 'grass',
            'couch', 'tennis court', 'umbrella', 'plate', 'building', 'fence',
            'T-shirt', 'cell phone', 'stop sign']
_NUMBERS = ['two', 'three', '2', '3', '1,000', '3.5', '10', 'several', 'many']
_PLACES = ['in the city', 'at night', 'on a sunny day', 'near the water',
           'in front of a building', 'during the day', 'at 5:30']
_RARE = ['xylophone', 'quokka', 'zeppelin', 'kumquat', 'okapi', 'theremin',
         'gazebo', 'accordion']
_ENDINGS = ['.', '.', '', '!', ' .', '?', '...']


def _noun_phrase(rng: random.Random) -> str:
  if rng.random() < 0.2:
    return f'{rng.choice(_NUMBERS)} {rng.choice(_SUBJECTS)}s'
  words = [rng.choice(['a', 'A', 'the', 'The', 'one'])]
  if rng.random() < 0.5:
    words.append(rng.choice(_ADJECTIVES))
  words.append(rng.choice(_SUBJECTS))
  if rng.random() < 0.15:
    words[-1] += "'s " + rng.choice(_OBJECTS)  # "man's umbrella"
  return ' '.join(words)


def _caption(rng: random.Random) -> str:
  """A COCO-like caption, with the punctuation and case captions have.

  Brackets, quotes, abbreviations and two sentences in one caption are
  included; only the rare cases the README lists as known tokenizer
  differences ('!!', 'w/', "'n'") are left out.
  """
  parts = [_noun_phrase(rng)]
  if rng.random() < 0.2:
    parts.append(rng.choice(['is', "who's", 'that is', "isn't"]))
  parts += [rng.choice(_VERBS), rng.choice(['a', 'the', 'an old']),
            rng.choice(_OBJECTS)]
  if rng.random() < 0.4:
    parts.append(rng.choice(_PLACES))
  if rng.random() < 0.2:
    parts[-1] += ','
    parts += [rng.choice(['and', 'while', 'but']), _noun_phrase(rng),
              rng.choice(_VERBS), 'it']
  if rng.random() < 0.1:
    parts.append(f'"{rng.choice(_RARE)}"')
  if rng.random() < 0.1:
    parts.append(rng.choice(["can't", "don't", 'cannot', 'gonna']))
  if rng.random() < 0.15:
    parts.append(rng.choice([
        f'({rng.choice(_RARE)})', "with a sign saying 'STOP'",
        '\u201cfresh\u201d', 'on Main St.', 'in the U.S.', 'at 5 p.m.',
        'with bus no. 5', 'and Dr. Smith', 'with balls, bats etc.']))
  text = ' '.join(parts) + rng.choice(_ENDINGS)
  if rng.random() < 0.1:  # Two sentences.
    text = text.rstrip(' .!?') + '. ' + rng.choice(['It is sunny', 'Wow.',
                                                    'The man\u2019s hat.'])
  if rng.random() < 0.2:
    text = text.upper() if rng.random() < 0.3 else text.capitalize()
  return text


def _candidate(rng: random.Random, refs: list[str]) -> str:
  kind = rng.random()
  if kind < 0.05:  # shares nothing with the references
    return ' '.join(rng.sample(_RARE, rng.randint(1, 4)))
  if kind < 0.15:  # one or two words
    return rng.choice(_SUBJECTS + _RARE + ['A dog.', 'Cats!', 'a man'])
  if kind < 0.35:  # a reference
    return rng.choice(refs)
  if kind < 0.55:  # a reference with a word dropped and two swapped
    words = rng.choice(refs).rstrip(' .!?').split()
    if len(words) > 3:
      del words[rng.randrange(len(words))]
      i = rng.randrange(len(words) - 1)
      words[i], words[i + 1] = words[i + 1], words[i]
    if len(words[-1]) == 1:
      # The Java tokenizer reads a final 'a.' as an initial: keeps the '.'.
      words.append(rng.choice(_OBJECTS))
    return ' '.join(words) + rng.choice(_ENDINGS)
  return _caption(rng)


def fidelity_set(seed: int = 0, num_images: int = 200, num_refs: int = 5):
  """(references, candidates) of generated captions, by image id."""
  rng = random.Random(seed)
  refs, cands = {}, {}
  for i in range(num_images):
    image_id = 100 + 7 * i
    refs[image_id] = [_caption(rng) for _ in range(num_refs)]
    cands[image_id] = _candidate(rng, refs[image_id])
  return refs, cands


@pytest.fixture(scope='module')
def official_tokens():
  """The fidelity set and its official tokens (gts, res), or a skip."""
  if shutil.which('java') is None:
    pytest.skip('Java is not installed: the official PTBTokenizer, the '
                'reference for tokenisation, is a Java program')
  try:
    # pylint: disable-next=g-import-not-at-top
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  except ImportError:
    pytest.skip('pycocoevalcap is not installed: nothing to compare with')
  refs, cands = fidelity_set()
  # One Java start-up for both sides.
  captions = {('ref', i): [{'caption': c} for c in v] for i, v in refs.items()}
  captions.update({('cand', i): [{'caption': c}] for i, c in cands.items()})
  try:
    tokens = PTBTokenizer().tokenize(captions)
  except OSError as e:  # it writes a temp file next to its jar
    pytest.skip(f'the official PTBTokenizer cannot run here: {e}')
  gts = {i: tokens[('ref', i)] for i in refs}
  res = {i: tokens[('cand', i)] for i in cands}
  return refs, cands, gts, res


def test_fidelity_set_is_varied():
  refs, cands = fidelity_set()
  lengths = [len(tokenizer.tokenize(c)) for c in cands.values()]
  assert len(refs) == 200 and min(lengths) <= 1 and max(lengths) >= 15
  text = ' '.join(c for v in refs.values() for c in v)
  assert all(s in text for s in ("'s", '-', ',', '"', 'A ', '3.5'))


def test_tokenizer_matches_the_official_ptbtokenizer(official_tokens):
  refs, cands, gts, res = official_tokens
  differences = [(caption, ours, official)
                 for image, captions in refs.items()
                 for caption, official in zip(captions, gts[image])
                 if (ours := ' '.join(tokenizer.tokenize(caption))) != official]
  differences += [(cands[i], ours, res[i][0]) for i in cands
                  if (ours := ' '.join(tokenizer.tokenize(cands[i])))
                  != res[i][0]]
  assert not differences


def test_metrics_match_pycocoevalcap(official_tokens):
  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  # pylint: enable=g-import-not-at-top
  refs, cands, gts, res = official_tokens
  expected = _official_scores(gts, res)
  ours = metrics.score(refs, cands, meteor='none')
  assert 0.2 < ours['BLEU-4'] < 0.8 and 0.3 < ours['CIDEr'] < 3
  for name, value in expected.items():
    assert ours[name] == pytest.approx(value, abs=1e-9), name
  # Per image too.
  _, ref_tokens, cand_tokens = metrics.tokenize_all(refs, cands)
  _, official_cider = Cider().compute_score(gts, res)
  _, official_rouge = Rouge().compute_score(gts, res)
  assert cider.per_image(ref_tokens, cand_tokens) == pytest.approx(
      list(official_cider), abs=1e-9)
  assert rouge.per_image(ref_tokens, cand_tokens) == pytest.approx(
      list(official_rouge), abs=1e-9)


@pytest.mark.slow
def test_java_meteor_matches_pycocoevalcap(official_tokens):
  if meteor.find_jar() is None:
    pytest.skip('pycocoevalcap has no METEOR jar')
  # pylint: disable-next=g-import-not-at-top
  from pycocoevalcap.meteor.meteor import Meteor
  refs, cands, gts, res = official_tokens
  expected, expected_per_image = Meteor().compute_score(gts, res)
  _, ref_tokens, cand_tokens = metrics.tokenize_all(refs, cands)
  value, per_image = meteor.java_meteor(
      [[' '.join(r) for r in image] for image in ref_tokens],
      [' '.join(c) for c in cand_tokens])
  assert value == pytest.approx(expected, abs=1e-6)
  assert per_image == pytest.approx(expected_per_image, abs=1e-6)


# ---------------------------------------------------------------------------
# METEOR: the Java protocol (with a stand-in for Java), NLTK with WordNet.

_FAKE_JAVA = '''#!{python}
"""Answers like METEOR 1.5 would: stats, per-image scores, corpus score."""
import os, sys
if sys.argv[1:] == ['-version']:
  sys.exit(0)
with open({log!r}, 'w') as log:
  log.write(os.getcwd() + '\\n' + ' '.join(sys.argv[1:]) + '\\n')
  if {crash!r}:
    sys.stderr.write('Exception in thread "main" java.lang.OutOfMemoryError\\n')
    sys.exit(1)
  log.flush()
  for line in sys.stdin:
    log.write(line)
    log.flush()  # Read while the process lives on: it is kept.
    fields = line.rstrip('\\n').split(' ||| ')
    if fields[0] == 'SCORE':  # stats: the number of references
      print(f'{{len(fields) - 2}} 0')
    else:
      for stats in fields[1:]:
        print(float(stats.split()[0]) / 10)
      print(0.5)
    sys.stdout.flush()
'''


def _fake_java(tmp_path, crash=False) -> tuple[str, str, str]:
  """(java, jar, log) for a stand-in `java` that logs what it is sent."""
  java = tmp_path / ('crashing_java' if crash else 'java')
  log = tmp_path / 'java.log'
  java.write_text(_FAKE_JAVA.format(python=sys.executable, log=str(log),
                                    crash=crash))
  java.chmod(0o755)
  jar = tmp_path / 'jars' / meteor.JAR_NAME
  jar.parent.mkdir(exist_ok=True)
  jar.write_bytes(b'')
  return str(java), str(jar), str(log)


def test_java_meteor_speaks_the_jar_protocol(tmp_path):
  java, jar, log = _fake_java(tmp_path)
  value, per_image = meteor.java_meteor(
      [['a man rides', 'a man ||| on a horse'], ['two dogs']],
      ['a man', 'dogs\nin snow'], jar=jar, java=java)
  assert value == 0.5 and per_image == [0.2, 0.1]
  with open(log) as f:
    lines = f.read().splitlines()
  assert os.path.realpath(lines[0]) == os.path.realpath(os.path.dirname(jar))
  assert lines[1:] == [
      f'-jar -Xmx2G {meteor.JAR_NAME} - - -stdio -l en -norm',
      'SCORE ||| a man rides ||| a man on a horse ||| a man',
      'SCORE ||| two dogs ||| dogs in snow',
      'EVAL ||| 2 0 ||| 1 0',
  ]


def test_java_meteor_failure_is_a_clear_error(tmp_path):
  java, jar, _ = _fake_java(tmp_path, crash=True)
  with pytest.raises(meteor.MeteorUnavailable,
                     match='failed: Exception in thread "main" '
                     'java.lang.OutOfMemoryError$'):
    meteor.java_meteor([['a b']], ['a'], jar=jar, java=java)
  with pytest.raises(meteor.MeteorUnavailable, match='Java was not found'):
    meteor.java_meteor([['a b']], ['a'], jar=jar,
                       java=str(tmp_path / 'no-java'))


def test_lexnames_are_wordnets():
  page = '/usr/share/man/man5/lexnames.5WN.gz'
  if not os.path.exists(page):
    pytest.skip(f'no {page} (Debian/Ubuntu package wordnet-base) to compare '
                'with')
  with gzip.open(page, 'rt') as f:
    documented = re.findall(r'^(\d\d)\t(\S+)', f.read(), re.MULTILINE)
  generated = [line.split('\t')[:2]
               for line in meteor._lexnames_text().splitlines()]
  assert generated == [list(entry) for entry in documented]
  assert len(generated) == 45


@pytest.fixture(scope='module')
def wordnet(tmp_path_factory):
  try:
    return meteor.load_wordnet(
        staging_dir=str(tmp_path_factory.mktemp('wordnet')))
  except meteor.MeteorUnavailable as e:
    pytest.skip(f'no WordNet installed, NLTK\'s METEOR cannot run: {e}')


def test_nltk_meteor_rewards_synonyms(wordnet):
  # 'sofa' and 'couch' share a WordNet synset; 'table' does not.
  refs = [[_t('a cat is sleeping on the couch')]]
  synonym, _ = meteor.nltk_meteor(refs, [_t('a cat is sleeping on the sofa')],
                                  wordnet=wordnet)
  unrelated, _ = meteor.nltk_meteor(
      refs, [_t('a cat is sleeping on the table')], wordnet=wordnet)
  same, _ = meteor.nltk_meteor(refs, [_t('a cat is sleeping on the couch')],
                               wordnet=wordnet)
  assert unrelated < synonym <= same <= 1
  assert same > 0.99


def test_nltk_meteor_in_score(wordnet, monkeypatch):
  monkeypatch.setattr(meteor, 'load_wordnet', lambda: wordnet)
  result = metrics.score({1: ['A cat sleeps on the couch.']},
                         {1: 'A cat sleeps on the sofa.'}, meteor='nltk')
  assert 0.5 < result['METEOR_nltk'] < 1


def test_wordnet_from_an_nltk_data_dir(wordnet, tmp_path):
  del wordnet  # Only there to skip without WordNet files.
  source = meteor.SYSTEM_WORDNET_DIRS[0]
  if not os.path.isdir(source):
    pytest.skip(f'builds the NLTK layout from {source}, which is missing')
  corpus = tmp_path / 'nltk_data' / 'corpora' / 'wordnet'
  corpus.mkdir(parents=True)
  for name in os.listdir(source):
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), corpus / name)
  (corpus / 'lexnames').write_text(meteor._lexnames_text())
  reader = meteor.load_wordnet(nltk_data_dirs=[str(tmp_path / 'nltk_data')],
                               system_dirs=[])
  assert reader.synsets('dog')[0].lexname() == 'noun.animal'


def test_missing_wordnet_is_a_clear_error(tmp_path):
  with pytest.raises(UserError) as e:
    meteor.load_wordnet(nltk_data_dirs=[str(tmp_path)],
                        system_dirs=[str(tmp_path / 'wordnet')])
  message = str(e.value)
  assert '\n' not in message
  for hint in ('Java', 'apt-get install wordnet-base',
               'python -m nltk.downloader wordnet', '--meteor=none'):
    assert hint in message
  # A broken WordNet is named, and is no crash either.
  (tmp_path / 'corpora' / 'wordnet').mkdir(parents=True)
  with pytest.raises(UserError, match='unusable: .*corpora/wordnet: ') as e:
    meteor.load_wordnet(nltk_data_dirs=[str(tmp_path)], system_dirs=[])
  assert '\n' not in str(e.value)


def test_java_meteor_keeps_its_process_between_calls(tmp_path):
  java, jar, log = _fake_java(tmp_path)
  first = meteor.java_meteor([['a b c'], ['d e']], ['a b', 'd'], jar=jar,
                             java=java)
  second = meteor.java_meteor([['x y'], ['z'], ['w v']], ['x', 'z', 'w'],
                              jar=jar, java=java)
  assert first == (0.5, [0.1, 0.1]) and second == (0.5, [0.1, 0.1, 0.1])
  with open(log) as f:
    lines = f.read().splitlines()
  # One start (the log is rewritten at each), both calls' requests.
  assert lines[1].startswith('-jar') and len(lines) == 2 + 3 + 4
  assert lines[-1] == 'EVAL ||| 1 0 ||| 1 0 ||| 1 0'
  # A kept process that died is replaced, and the call still scores.
  (process,) = [p for k, p in meteor._processes.items() if k[2] == java]  # pylint: disable=protected-access
  process._process.kill()  # pylint: disable=protected-access
  process._process.wait()  # pylint: disable=protected-access
  assert meteor.java_meteor([['a b']], ['a'], jar=jar, java=java) == (
      0.5, [0.1])
