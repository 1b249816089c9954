"""The typed run configuration: every earlier config.json loads (and builds its learner), errors name the setting
(the CLI its flag), the options are declared once for every command, and fastai's own pieces are used."""
import json, warnings
from pathlib import Path

import pytest, torch
from typer.testing import CliRunner
from xray_fastai.core import ConfigError, ConfigWarning, XrayError
from xray_fastai.config import RunConfig, SETTINGS, RECIPES
from xray_fastai.cli import app, main, RUN_OPTIONS, flag, as_flags

FIXTURES = sorted((Path(__file__).parent/'fixtures'/'configs').glob('*.json'))


def test_fixtures_cover_every_version_of_the_config():
    "The fixtures are config.json files of real runs made by seven earlier versions (tests/fixtures/configs/make_configs.py)."
    assert len(FIXTURES) >= 7
    keys = [set(json.loads(f.read_text())) for f in FIXTURES]
    assert len({frozenset(k) for k in keys}) >= 5  # versions with different fields


@pytest.mark.parametrize('fixture', FIXTURES, ids=lambda f: f.stem)
def test_every_earlier_config_loads_and_builds_its_learner(fixture, mini_npz, tmp_path):
    d = json.loads(fixture.read_text())
    c = RunConfig.load(fixture)
    assert {k: getattr(c, k) for k in d if k in SETTINGS} == {k: v for k, v in d.items() if k in SETTINGS}
    assert c.to_dict().items() >= d.items()  # saved again, nothing recorded is lost
    assert c.precision == d.get('precision', 'auto' if torch.cuda.is_available() else 'fp32')  # bf16 was GPU-only before
    assert c.keep_checkpoints == d.get('keep_checkpoints', True)  # runs were not lean before
    assert c.aug_kwargs == d.get('aug_kwargs', {}) and c.site == d.get('site') and c.mixup == d.get('mixup', 0.)
    # the run's data, here: the learner a resumed or evaluated run gets
    from xray_fastai.learner import _build
    c.source, c.counts = str(mini_npz), None
    learn = _build(c, tmp_path)
    assert (learn.dls.bs, c.classes, c.size) == (d['bs'], d['classes'], d['size'])
    trainable = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in learn.model[1].parameters())  # frozen: the head alone


def test_unknown_keys_are_kept(tmp_path):
    d = {**RunConfig(arch='resnet18', pretrained=False).to_dict(), 'from_a_newer_version': [1, 2]}
    (tmp_path/'config.json').write_text(json.dumps(d))
    c = RunConfig.load(tmp_path)
    assert c.extra == {'from_a_newer_version': [1, 2]}
    c.save(tmp_path/'again.json')
    assert json.loads((tmp_path/'again.json').read_text()) == d


def test_damaged_config_is_one_clear_error(tmp_path):
    (tmp_path/'config.json').write_text('[1, 2]')
    with pytest.raises(XrayError, match='config.json is damaged'): RunConfig.load(tmp_path)
    with pytest.raises(XrayError, match='not a run folder'): RunConfig.load(tmp_path/'nothing')


@pytest.mark.parametrize('settings,python,cli', [
    (dict(epochs=0), '`epochs` must be positive, got 0', '--epochs must be positive, got 0'),
    (dict(frozen=True, freeze_epochs=1), '`freeze_epochs` is for fine-tuning; `frozen` trains only the head',
     '--freeze-epochs is for fine-tuning; --frozen trains only the head'),
    (dict(monitor='site_roc_auc_score'), 'needs a site sample: give `site`', 'needs a site sample: give --site'),
    (dict(aug_kwargs={'max_rotat': 5}), "['max_rotat'] in `aug_kwargs`", "['max_rotat'] in --aug-param"),
    (dict(lr='fast'), "`lr` must be a number or 'auto'", "--lr must be a number or 'auto'"),
    (dict(mixup=0.4, frozen=True, aug=False), '`mixup` mixes images', '--mixup mixes images'),
    (dict(valid_pct=0.9), '`valid_pct` must be in (0, 0.5], got 0.9', '--valid-pct must be in (0, 0.5], got 0.9'),
])
def test_errors_name_the_setting_and_the_cli_its_flag(settings, python, cli, capsys):
    with pytest.raises(ConfigError) as e: RunConfig(**settings)
    assert python in str(e.value)
    assert cli in as_flags(str(e.value))


def test_cli_maps_a_config_error_to_flags(capsys):
    with pytest.raises(SystemExit) as e: main(['train', '--frozen', '--freeze-epochs', '1', '--no-pretrained'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == 'error: --freeze-epochs is for fine-tuning; --frozen trains only the head'


def test_misspelt_setting_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown setting 'epoch': did you mean `epochs`"): RunConfig.from_recipe(epoch=3)
    with pytest.raises(ConfigError, match='unknown `recipe`'): RunConfig.from_recipe('mnist')


def test_frozen_random_body_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        RunConfig(frozen=True, pretrained=False)
        RunConfig(frozen=True, pretrained=False, weights=__file__)  # an earlier model's weights: no warning
        RunConfig(pretrained=False)  # fine-tuning from scratch: no warning
    assert [w.category for w in caught] == [ConfigWarning]
    assert '`frozen` with neither `pretrained` nor `weights`' in str(caught[0].message)
    assert '--frozen with neither --pretrained nor --weights' in as_flags(str(caught[0].message))


def test_recipe_settings_are_overridden_and_recorded():
    c = RunConfig.from_recipe('pneumoniamnist', epochs=2, aug_kwargs={'max_rotate': 3})
    r = RECIPES['pneumoniamnist']
    assert (c.recipe, c.arch, c.epochs, c.lr) == ('pneumoniamnist', r['arch'], 2, r['lr'])
    assert c.aug_kwargs == {**r.get('aug_kwargs', {}), 'max_rotate': 3}  # the recipe's augmentation settings, merged


def _params(command:str) -> dict:
    "The click parameters of an `xray-fastai` command, by name."
    import typer.main
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize('command', ['train', 'experiment', 'lr-find', 'tune'])
def test_run_options_are_declared_once(command):
    "Every command's run options are `RUN_OPTIONS`' own: the same flags, help and `RunConfig` defaults."
    from xray_fastai.cli import _param
    train, params = _params('train'), _params(command)
    shared = [k for k in RUN_OPTIONS if _param(k) in params]
    assert {'source', 'bs', 'seed', 'precision', 'aug_kwargs', 'verify'} <= set(shared)
    defaults = RunConfig.__dataclass_fields__
    for k in shared:
        name = _param(k)
        p = params[name]
        if command == 'tune' and k == 'monitor': continue  # tune's --monitor is its objective, with its own help
        assert (p.opts, p.help) == (train[name].opts, train[name].help)
        assert flag(k) in p.opts + p.secondary_opts
        if name == k: assert p.default == defaults[k].default, k


def test_every_setting_given_on_the_command_line_reaches_the_run(mini_npz, monkeypatch):
    "`train`'s options map to `RunConfig` settings (the CLI's names and forms converted)."
    import xray_fastai.learner as learner
    seen = {}
    def fake_train(config=None, out=None, cbs=None, **settings):
        seen.update(config=config, settings=settings); raise XrayError('stop here')
    monkeypatch.setattr(learner, 'train', fake_train)
    r = CliRunner().invoke(app, ['train', '-s', str(mini_npz), '--aug-param', 'max_rotate=3', '--no-verify', '--bs', '16',
                                 '--keep-checkpoints', '--checkpoint-every', '5'])
    assert isinstance(r.exception, XrayError) and seen['settings'] == {}  # the CLI built and checked the `RunConfig`
    c = seen['config']
    assert (c.source, c.aug_kwargs, c.verify, c.bs, c.keep_checkpoints, c.checkpoint_every) == \
           (str(mini_npz), {'max_rotate': 3.0}, False, 16, True, 5)


def test_fastai_model_meta_is_left_alone():
    "Importing xray-fastai does not change fastai's resnet entries; our learners still get 4 layer groups."
    from fastai.vision.learner import model_meta, _resnet_split
    from torchvision.models import resnet18, resnet34, resnet50
    import xray_fastai.learner  # noqa: F401
    assert all(model_meta[a]['split'] is _resnet_split for a in (resnet18, resnet34, resnet50))
    from xray_fastai.models import layer_groups
    assert list(layer_groups('resnet18')) == ['stem', 'early', 'late', 'head']


def test_history_is_fastais_csvlogger_and_divergence_its_terminate_on_nan():
    from fastai.callback.progress import CSVLogger
    from fastai.callback.tracker import TerminateOnNaNCallback
    from xray_fastai.callbacks import HistoryCallback, DivergenceCallback
    assert issubclass(HistoryCallback, CSVLogger) and issubclass(DivergenceCallback, TerminateOnNaNCallback)
