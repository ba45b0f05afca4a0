"""Built-in verifiable task, its tokenizer, prompt datasets and reward functions.

arithmetic.py  seeded arithmetic problems with written-out solutions (long-tailed lengths)
tokenizer.py   char-level `tokenizers` tokenizer + HF-loadable tokenizer files
data.py        JSONL / Parquet prompt files (via `datasets`, imported lazily) and the task view
reward.py      exact-answer reward, user rewards by import path, weighted combination
"""

from .arithmetic import (
    ANSWER_MARKER, DEFAULT_FAMILIES, DEFAULT_WEIGHTS, FAMILIES, ArithmeticTask, Difficulty, Problem,
)
from .data import (
    DataError, PromptDataset, PromptRecord, builtin_prompts, collate_columns, load_prompts, write_task_jsonl,
)
from .reward import (
    BUILTIN_REWARDS, CombinedReward, RewardError, RewardFunction, RewardResult, exact_answer_reward, load_reward_fn,
    parse_answer,
)
from .tokenizer import BOS, EOS, PAD, UNK, VOCAB, build_tokenizer, save_tokenizer_files

__all__ = [
    "ANSWER_MARKER", "DEFAULT_FAMILIES", "DEFAULT_WEIGHTS", "FAMILIES", "ArithmeticTask", "Difficulty", "Problem",
    "DataError", "PromptDataset", "PromptRecord", "builtin_prompts", "collate_columns", "load_prompts",
    "write_task_jsonl",
    "BUILTIN_REWARDS", "CombinedReward", "RewardError", "RewardFunction", "RewardResult", "exact_answer_reward",
    "load_reward_fn", "parse_answer",
    "BOS", "EOS", "PAD", "UNK", "VOCAB", "build_tokenizer", "save_tokenizer_files",
]
