"""The cleaned Python code corpus (Codex): collect, filter, deduplicate, decontaminate
against HumanEval, split, and prepare as a tfds dataset.

  python -m experiments.code_corpus --flagfile=experiments/configs/code_corpus.flags \
      [--out_dir=runs/code_corpus]

Writes code_train.jsonl / code_validation.jsonl ({"text", "path"} per line; pass them to
experiments.pretrain as --train_files / --eval_files), report.json and the tfds build under
<out_dir>/tfds, and prints how many files and bytes each filter removed. A rerun with the
same inputs and flags reuses the outputs. See instructjax/codex/corpus.py for the filters.
"""

from __future__ import annotations

from absl import app, flags

from experiments.errors import user_facing
from instructjax.codex import corpus

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "runs/code_corpus", "Output directory.")
flags.DEFINE_list("roots", list(corpus.SYMBOLIC_ROOTS),
                  "Directories to collect *.py from; stdlib, purelib and platlib name the "
                  "running Python's (sysconfig) directories.")
flags.DEFINE_list("exclude_dirs", ["site-packages", "dist-packages", "__pycache__"],
                  "Directory names skipped below a root (site-packages inside the stdlib "
                  "holds installed packages, which purelib covers).")
flags.DEFINE_integer("max_files", 0, "Take at most this many files (stable path-hash sample); 0 = all.")
flags.DEFINE_integer("max_bytes", 0, "Take at most this many bytes of files; 0 = no cap.")
flags.DEFINE_integer("max_file_bytes", 1_000_000, "Drop files larger than this.")
flags.DEFINE_integer("min_code_lines", 3, "Drop files with fewer non-blank, non-comment lines.")
flags.DEFINE_integer("generated_marker_lines", 20, "Leading lines searched for auto-generated markers.")
flags.DEFINE_float("max_mean_line_length", 100.0, "Drop files with a longer mean line length.")
flags.DEFINE_integer("max_line_length", 1000, "Drop files with a longer line.")
flags.DEFINE_float("min_alnum_fraction", 0.25, "Drop files with fewer alphanumeric characters.")
flags.DEFINE_float("near_dup_threshold", 0.8, "MinHash Jaccard at which a file is a near duplicate; 0 = off.")
flags.DEFINE_integer("shingle_tokens", 5, "Tokens per MinHash shingle.")
flags.DEFINE_integer("minhash_perms", 128, "MinHash signature length.")
flags.DEFINE_integer("decontam_ngram", 13, "Token n-gram length for decontamination; 0 = off.")
flags.DEFINE_float("decontam_min_overlap", 0.5, "Drop a file holding this share of the n-grams "
                   "of a problem's prompt or canonical solution.")
flags.DEFINE_string("decontam_problems", "", "Problem file (HumanEval format); default: HumanEval.")
flags.DEFINE_float("validation_fraction", 0.02, "Share of files (by path hash) in validation.")
flags.DEFINE_bool("prepare_tfds", True, "Also prepare the splits as a tfds (ArrayRecord) dataset.")
flags.DEFINE_string("tfds_data_dir", "", "Where the tfds dataset goes; default <out_dir>/tfds.")


def config_from_flags() -> corpus.CorpusConfig:
    return corpus.CorpusConfig(
        out_dir=FLAGS.out_dir, roots=tuple(FLAGS.roots), exclude_dirs=tuple(FLAGS.exclude_dirs),
        max_files=FLAGS.max_files, max_bytes=FLAGS.max_bytes, max_file_bytes=FLAGS.max_file_bytes,
        min_code_lines=FLAGS.min_code_lines, generated_marker_lines=FLAGS.generated_marker_lines,
        max_mean_line_length=FLAGS.max_mean_line_length, max_line_length=FLAGS.max_line_length,
        min_alnum_fraction=FLAGS.min_alnum_fraction, near_dup_threshold=FLAGS.near_dup_threshold,
        shingle_tokens=FLAGS.shingle_tokens, minhash_perms=FLAGS.minhash_perms,
        decontam_ngram=FLAGS.decontam_ngram, decontam_problems=FLAGS.decontam_problems,
        decontam_min_overlap=FLAGS.decontam_min_overlap,
        validation_fraction=FLAGS.validation_fraction, prepare_tfds=FLAGS.prepare_tfds,
        tfds_data_dir=FLAGS.tfds_data_dir)


def main(argv):
    cfg = config_from_flags()
    report = corpus.build_corpus(cfg)
    print(corpus.format_report(report))
    print(f"wrote {cfg.out_dir}/code_train.jsonl, code_validation.jsonl and report.json")


if __name__ == "__main__":
    app.run(user_facing(main, also=(ValueError, OSError)))
