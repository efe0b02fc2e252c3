"""Bad input to the patch engine and its CLI: one `error: ...` line, a non-zero exit, data intact.

Grow this module with every engine bug found from bad input (a test that failed before its fix).
"""

from hfpatch import actions, patching, zoo


def test_every_user_error_derives_from_one_base():
    from hfpatch import drift, engines, errors, upstream
    from hfpatch.train import errors as train_errors

    for cls in (zoo.ZooError, actions.ActionError, patching.PatchError, upstream.UpstreamError, engines.EngineError,
                drift.DriftError, train_errors.TrainError):
        assert issubclass(cls, errors.UserError), cls
