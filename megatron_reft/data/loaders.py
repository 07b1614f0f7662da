"""Loaders: the ReFT authors' JSON, the original GSM8K JSONL, our own JSONL, Hugging Face datasets.

Every loader yields the same Record (records.py). Three row schemas are understood, in a JSON
list or in JSON lines alike (reft.md §7):

    mwp_reft  {item_id, question, answer_cot?, answer_value}       the ReFT authors' files
    gsm8k     {question, answer}, answer = CoT with <<a*b=c>> marks + "#### 72"   OpenAI's files
    jsonl     {id, question, cot, answer, choices?, meta?}          ours (records.Record.to_json)

A path "hf:<name-or-path>[@config][:split]" goes through datasets.load_dataset (local files and
save_to_disk folders work offline; hub ids need a network) and then through the same schemas.
"""
import json
import os
import re

from megatron_reft.data.prompts import PROGRAM_HEADER, check_cot_type
from megatron_reft.data.records import LoadReport, Record, check_policy, parse_choices, parse_number

SCHEMAS = ("mwp_reft", "gsm8k", "jsonl")
CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")


class _Malformed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# reading rows


def _read_json_rows(path: str) -> tuple[str, list]:
    """(container, rows): a JSON list, or JSON lines (a bad line becomes an _Malformed row)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}, "
                         f"line {line}); convert the file to UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return "json list", rows
    _refuse_single_json_document(path, text)
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue  # blank lines are not records (a trailing newline is normal)
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_Malformed("invalid_json", f"{error.msg} at column {error.colno}"))
    return "json lines", rows


def _refuse_single_json_document(path: str, text: str) -> None:
    """A file that is one JSON value spread over several lines (e.g. {"data": [...]}) is neither
    a JSON list nor JSON lines: say so instead of reporting every line as a malformed record."""
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return  # one line: a one-record JSON-lines file
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    kind = type(value).__name__ if not isinstance(value, dict) else f"object with keys {sorted(value)[:5]}"
    raise ValueError(f"{path}: a single JSON {kind}, expected a JSON list of records or JSON lines "
                     "(one record per line)")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """"hf:openai/gsm8k@main:test" -> ("openai/gsm8k", "main", "test")."""
    name = spec[len("hf:"):] if spec.startswith("hf:") else spec
    split = None
    head, sep, tail = name.rpartition(":")
    if sep and head and re.fullmatch(r"[A-Za-z_][\w\-]*", tail):
        name, split = head, tail
    config = None
    head, sep, tail = name.rpartition("@")
    if sep and head and "/" not in tail:
        name, config = head, tail
    return name, config, split


def _read_hf_rows(spec: str) -> tuple[str, list]:
    try:
        import datasets  # heavy import, only when asked for; optional: pip install 'megatron-reft[data]'
    except ImportError:
        raise ValueError(f"{spec}: hf: data needs the datasets package (pip install 'megatron-reft[data]')") from None

    name, config, split = parse_hf_spec(spec)
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(name)
    elif os.path.isfile(name):
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(name)[1])
        if builder is None:
            raise ValueError(f"{spec}: unknown file type for datasets.load_dataset (use .json/.jsonl/.csv/.parquet)")
        data = datasets.load_dataset(builder, data_files=name)
    else:
        data = datasets.load_dataset(name, config)  # a hub id or a local dataset folder
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise ValueError(f"{spec}: choose a split with hf:<name>:<split>; available: {sorted(data)}")
        data = data[split]
    return f"hf datasets, split {split}", [dict(row) for row in data]


def detect_schema(row: dict) -> str:
    keys = set(row)
    if "item_id" in keys:
        return "mwp_reft"
    if "id" in keys:
        return "jsonl"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    raise ValueError(f"cannot tell the format from the fields {sorted(keys)}; expected {{item_id, question, "
                     "answer_cot, answer_value}, {question, answer} or {id, question, cot, answer}")


# ---------------------------------------------------------------------------------------------
# one row -> one Record


def _text_field(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _Malformed(f"missing_{key}", f"field {key!r} is missing or empty")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _Malformed("bad_field_type", f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def split_gsm8k_solution(solution: str) -> tuple[str, str]:
    """OpenAI GSM8K answer -> (N-CoT without calculator marks, final answer without commas).

    "48/2 = <<48/2=24>>24 clips.\n#### 72" -> ("48/2 = 24 clips.", "72"); the reference N-CoT
    ending "\nTherefore, the answer is: 72" is added later by prompts.ncot_target, so the SFT
    target matches the ReFT authors' GSM8K files (their answers carry no thousands separators).
    """
    body, sep, final = solution.rpartition("####")
    if not sep:
        raise _Malformed("missing_final_answer", "GSM8K answer has no '#### <number>' line")
    return CALCULATOR_MARK.sub("", body).strip(), final.strip().replace(",", "")


def _row_to_record(row, schema: str, index: int) -> Record:
    if isinstance(row, _Malformed):
        raise row
    if not isinstance(row, dict):
        raise _Malformed("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    if schema == "mwp_reft":
        return Record(id=_text_field(row, "item_id"), question=_text_field(row, "question"),
                      cot=_text_field(row, "answer_cot", required=False),
                      answer=_text_field(row, "answer_value").strip())
    if schema == "gsm8k":
        cot, answer = split_gsm8k_solution(_text_field(row, "answer"))
        return Record(id=f"gsm8k_{index}", question=_text_field(row, "question"), cot=cot or None, answer=answer)
    choices = row.get("choices")
    if choices is not None and not isinstance(choices, dict):
        raise _Malformed("bad_field_type", "field 'choices' must be an object {letter: option}")
    return Record(id=_text_field(row, "id"), question=_text_field(row, "question"),
                  cot=_text_field(row, "cot", required=False), answer=_text_field(row, "answer").strip(),
                  choices=choices, meta=dict(row.get("meta") or {}))


def _check_answer(record: Record) -> None:
    if record.answer_type == "number":
        if parse_number(record.answer) is None:
            raise _Malformed("non_numeric_answer", f"{record.id}: answer {record.answer!r} is not a number")
        return
    if record.choices is None:
        record.choices = parse_choices(record.question)
    if record.choices is None:
        raise _Malformed("missing_choices", f"{record.id}: no 'a ) ... , b ) ...' options in the question")
    if record.answer.strip().lower() not in record.choices:
        raise _Malformed("answer_not_a_choice", f"{record.id}: answer {record.answer!r} not in {sorted(record.choices)}")


def _check_cot(record: Record, cot_type: str, require_cot: bool) -> None:
    """A CoT of the wrong kind is rejected when CoTs are required, else dropped (RL needs none)."""
    if record.cot is not None:
        is_program = record.cot.lstrip().startswith(PROGRAM_HEADER.strip())
        if is_program != (cot_type == "pcot"):
            if require_cot:
                reason = "cot_is_a_program" if is_program else "cot_not_a_program"
                raise _Malformed(reason, f"{record.id}: cot does not fit cot_type={cot_type!r}")
            record.cot = None
    if require_cot and record.cot is None:
        raise _Malformed("missing_cot", f"{record.id}: no CoT (test sets need require_cot=False)")


# ---------------------------------------------------------------------------------------------
# the entry point


def load_records(path: str, cot_type: str = "ncot", fmt: str = "auto", on_malformed: str = "report",
                 require_cot: bool = True) -> tuple[list[Record], LoadReport]:
    """Load one file (or hf: dataset) into Records; malformed rows are counted or raise.

    fmt: "auto" (schema from the first row's fields), "mwp_reft", "gsm8k" or "jsonl"; "hf" reads
    path through `datasets` ("hf:..." paths do so anyway) and then detects the schema.
    on_malformed: "report" skips bad records, counts them by reason in the LoadReport and logs a
    warning; "raise" raises MalformedRecordError (a ValueError) naming file, record index, reason.
    require_cot: SFT needs a CoT of the given cot_type; RL and evaluation do not (False).
    """
    check_cot_type(cot_type)
    check_policy(on_malformed)
    if fmt == "hf" or path.startswith("hf:"):
        container, rows = _read_hf_rows(path)
    else:
        container, rows = _read_json_rows(path)
    schema = fmt if fmt not in ("auto", "hf") else _first_schema(rows, path)
    if schema not in SCHEMAS:
        raise ValueError(f"fmt must be 'auto', 'hf' or one of {SCHEMAS}, got {fmt!r}")
    if schema == "gsm8k" and cot_type == "pcot" and require_cot:
        raise ValueError(f"{path}: GSM8K JSONL has natural-language solutions only; "
                         "cot_type='pcot' works only with require_cot=False")
    report = LoadReport(source=path, fmt=f"{schema} ({container})")
    records, seen_ids = [], set()
    for index, row in enumerate(rows):
        try:
            record = _row_to_record(row, schema, index)
            _check_answer(record)
            _check_cot(record, cot_type, require_cot)
            if record.id in seen_ids:
                raise _Malformed("duplicate_id", f"id {record.id!r} seen before")
        except _Malformed as bad:
            report.reject(index, bad.reason, bad.detail, on_malformed)
            continue
        seen_ids.add(record.id)
        records.append(record)
    report.loaded = len(records)
    if not records:
        raise ValueError(f"no usable records: {report}")
    report.warn_if_malformed()
    return records, report


def _first_schema(rows: list, path: str) -> str:
    for row in rows:
        if isinstance(row, dict):
            try:
                return detect_schema(row)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
    raise ValueError(f"{path}: no JSON objects found")


def save_records(records: list[Record], path: str) -> None:
    """Write records as our JSONL ({id, question, cot, answer, choices?, meta?}), one per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
