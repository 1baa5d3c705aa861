import castore


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(castore) if not name.startswith("_")}
    assert set(castore.__all__) - {"__version__"} == public


def test_every_exception_derives_from_castore_error() -> None:
    for name in castore.__all__:
        obj = getattr(castore, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, castore.CastoreError), name
