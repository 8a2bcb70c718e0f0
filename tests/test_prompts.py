"""Prompt sources: text files and tables (Pick-a-Pic parquet, PartiPrompts tsv, HPSv2-style json)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spo_fast.core.config import ConfigError
from spo_fast.data import load_prompts


def test_tables_give_their_prompt_column_deduplicated(tmp_path):
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", "", None], "label_0": [1, 0, 1, 0, 1]}),
                   tmp_path / "pap.parquet")
    assert load_prompts(str(tmp_path / "pap.parquet")) == ["a cat", "a dog"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nA red car\tVehicles\nA blue sky\tNature\n")
    assert load_prompts(str(tmp_path / "parti.tsv")) == ["A red car", "A blue sky"]
    assert load_prompts(f"{tmp_path / 'parti.tsv'}:Category") == ["Vehicles", "Nature"]
    (tmp_path / "hps.json").write_text(json.dumps(["one", "two", "one"]))
    assert load_prompts(str(tmp_path / "hps.json")) == ["one", "two"]
    (tmp_path / "objs.json").write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert load_prompts(str(tmp_path / "objs.json")) == ["x", "y"]
    (tmp_path / "plain.txt").write_text("b\na\nb\n")
    assert load_prompts(str(tmp_path / "plain.txt")) == ["b", "a", "b"]  # a text file is taken as given


@pytest.mark.parametrize("name, content, needle", [
    ("p.parquet:nope", None, "expected column 'nope'; the table has caption"),
    ("q.parquet", "not parquet", "cannot be read as a parquet table"),
    ("e.json", "{}", "expected a JSON list of prompts"),
    ("t.tsv", "Other\nx\n", "expected a column named one of caption, prompt, Prompt, text"),
    ("blank.tsv", "Prompt\n \n", "holds no prompts"),
    ("none.txt", None, "does not exist"),
])
def test_bad_prompt_tables_name_the_file_and_the_fix(tmp_path, name, content, needle):
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "p.parquet")
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match="--prompts=") as e:
        load_prompts(str(tmp_path / name), key="--prompts")
    assert needle in str(e.value)
