"""Task functions of ``psa_synth_long``; importing this module generates its dataset if missing."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("psa_synth_utils", Path(__file__).with_name("utils.py"))
_utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_utils)

TASK = "psa_synth_long"
_utils.ensure_data(TASK)

doc_to_visual = _utils.make_doc_to_visual(TASK)
doc_to_text = _utils.doc_to_text
process_results = _utils.process_results
aggregate_kind_accuracy = _utils.aggregate_kind_accuracy
