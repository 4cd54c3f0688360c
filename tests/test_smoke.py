"""The gateway starts on the test repository and reports every model's state."""

import tritonclient.http as httpclient


def test_index_lists_ready_and_broken_models(gateway):
    client = httpclient.InferenceServerClient(gateway.http_url)
    index = {(m["name"], m.get("version", "")): m for m in client.get_model_repository_index()}
    assert index[("mlp", "1")]["state"] == "READY"
    assert {index[("scaled", v)]["state"] for v in ("1", "2", "3")} == {"READY"}
    broken = index[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE"
    assert broken["reason"]
    assert client.is_server_ready()
