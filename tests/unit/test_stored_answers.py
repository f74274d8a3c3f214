"""What the forwarder keeps of each answer in a group: the stored form of a v2 response, the
error of one that is not, nothing for an item the cloud did not answer with a 200."""

from __future__ import annotations

import numpy as np

from model_runtime.errors import InvalidInput
from model_runtime.infer_group import GroupItemAnswer
from model_runtime.v2_json import encode_infer_response
from router.forwarder import stored_answers
from router.tickets import decode_result


def test_each_item_gets_its_stored_answer_its_error_or_nothing() -> None:
    good = encode_infer_response("digits", {"label": np.array([7], dtype=np.int64)})
    bad = {"model_name": "digits", "outputs": [{"name": "label", "datatype": "INT64"}]}
    stored = stored_answers(
        [
            GroupItemAnswer("a", 200, good),
            GroupItemAnswer("b", 200, bad),
            GroupItemAnswer("c", 409, None, "still running", 1.5),
        ]
    )
    assert isinstance(stored[0], bytes)
    outputs, _ = decode_result(stored[0])
    np.testing.assert_array_equal(outputs["label"], [7])
    assert isinstance(stored[1], InvalidInput)
    assert stored[2] is None
