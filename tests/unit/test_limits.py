from server.limits import ConnectionCaps


def test_caps_count_all_keys_or_none_and_release() -> None:
    caps = ConnectionCaps({"link": 2, "ip": 3, "production": 0})
    k = {"link": "a", "ip": "1.1.1.1", "production": "7"}
    assert caps.acquire(k) is None and caps.acquire(k) is None
    assert caps.acquire(k) == "link"
    assert caps.open("ip", "1.1.1.1") == 2  # the refused one counted nowhere
    assert caps.acquire({"link": "b", "ip": "1.1.1.1", "production": "7"}) is None
    assert caps.acquire({"link": "c", "ip": "1.1.1.1", "production": "7"}) == "ip"
    for _ in range(100):  # 0: no cap of that kind
        assert caps.acquire({"link": f"x{_}", "ip": f"ip{_}", "production": "7"}) is None
    caps.release(k)
    assert caps.acquire(k) is None
    for key in [k, k, {"link": "b", "ip": "1.1.1.1", "production": "7"}]:
        caps.release(key)
    assert caps.open("ip", "1.1.1.1") == 0 and caps.open("link", "a") == 0
