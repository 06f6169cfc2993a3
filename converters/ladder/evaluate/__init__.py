"""Measure every quant of a ladder against its reference, check it, gate it, and write report.json.

The modules, from the bottom up:

- :mod:`.perplexity` -- llama-perplexity's argv, runs and output parsers (the per-chunk KLD series included), and
  the base-logits file format (``run_base``, ``run_kld``, ``BaseLogits`` and its views, ``count_tokens``);
- :mod:`.sequential` -- scoring a file's chunks in batches until its mean KLD is known well enough (the stopping
  rule is pure: ``stop_reason``);
- :mod:`.source` -- the BF16 reference against the source checkpoint in transformers (``compare_with_source``
  in the parent, ``compare_here`` in the child) and the tokenizer / template checks against the source folder;
- :mod:`.curve` -- the ladder's own KLD curve: outliers and order inversions (pure);
- :mod:`.paired` -- the paired per-chunk test of a file against its baseline (a tuned file against its stock
  file, a memory-budget file against the largest stock file that fits): ``compare`` (pure);
- :mod:`.overlap` -- the evaluation text against the calibration text: shared 13-word runs (``check``);
- :mod:`.verdict` -- the gate (pure): ceilings, ``judge_file`` (one file against those measured before it),
  ``awaits_curve`` (a verdict not final until the ladder's curve around the file is measured), ``judge``, ``gate``,
  ``publishable``; :mod:`.settle` -- the files held until then, settled when a later measurement brackets them
  (pure);
- :mod:`.inputs` -- ``EvalOptions``, the validated inputs and the record keys; :mod:`.checks` -- the reference's and
  each quant's checks; :mod:`.reporting` -- report.json's blocks, the chart and the stage record;
- :mod:`.evaluation` -- ``LadderEvaluation`` (open once per job, ``measure`` each file as soon as it exists,
  ``finish``) and ``run`` (all of it for a finished ladder).

This package's public API, the names other packages use, is re-exported here (``from converters.ladder import
evaluate`` then ``evaluate.run(...)``); code that needs anything else imports the submodule that defines it.
"""

from converters.ladder.evaluate.evaluation import LadderEvaluation, run
from converters.ladder.evaluate.inputs import BASE_STAGE, DEFAULT_CHUNKS, N_PREDICT, STAGE, EvalOptions
from converters.ladder.evaluate.perplexity import (KLD_TIMEOUT, LOGITS_MAGIC, BaseLogits, base_logits_bytes,
                                                   chunk_klds, count_tokens, parse_base_output, parse_kld_output,
                                                   run_base, run_kld, scored_per_chunk)
from converters.ladder.evaluate.sequential import MIN_CHUNKS, PRECISION, Z_VERDICT, StopRule, stop_reason
from converters.ladder.evaluate.source import CompareSpec, compare_here, compare_with_source, source_checks
from converters.ladder.evaluate.verdict import (Verdict, ceiling_for, curve_points, default_ceiling, expected_klds,
                                                gate, judge, judge_file, publishable, tuned_reasons)

__all__ = ["BASE_STAGE", "DEFAULT_CHUNKS", "N_PREDICT", "STAGE", "EvalOptions", "LadderEvaluation", "run",
           "KLD_TIMEOUT", "LOGITS_MAGIC", "BaseLogits", "base_logits_bytes", "chunk_klds", "count_tokens",
           "parse_base_output", "parse_kld_output", "run_base", "run_kld", "scored_per_chunk",
           "MIN_CHUNKS", "PRECISION", "Z_VERDICT", "StopRule", "stop_reason",
           "CompareSpec", "compare_here", "compare_with_source", "source_checks",
           "Verdict", "ceiling_for", "curve_points", "default_ceiling", "expected_klds", "gate", "judge",
           "judge_file", "publishable", "tuned_reasons"]
