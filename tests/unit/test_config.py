"""util.config: precedence default < YAML preset < CLI, YAML checking and coercion, reference command line."""
import json
import os
import shlex

import pytest
import yaml

from helpers import FIXTURES, ROOT
from util.config import config_to_dict, get_args_parser, load_yaml_preset, resolve_config, save_config
from util.errors import UserError

# The fine-tuning command of the RETFound_MAE README (rmaphoh/RETFound_MAE), with `python` in place of torchrun.
REFERENCE_CMD = """main_finetune.py --model RETFound_mae --savemodel --global_pool --batch_size 16 --world_size 1
  --epochs 100 --blr 5e-3 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.2 --nb_classes 5
  --data_path ./IDRiD --input_size 224 --task RETFound_mae_meh-IDRiD --finetune RETFound_mae_meh"""


def _yaml(tmp_path, text, name='preset.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_reference_command_line_parses_unchanged():
    argv = shlex.split(REFERENCE_CMD)[1:]
    cfg = resolve_config(argv)
    assert cfg.model == 'RETFound_mae' and cfg.savemodel is True and cfg.global_pool is True
    assert (cfg.batch_size, cfg.epochs, cfg.nb_classes, cfg.input_size, cfg.world_size) == (16, 100, 5, 224, 1)
    assert (cfg.blr, cfg.layer_decay, cfg.weight_decay, cfg.drop_path) == (5e-3, 0.65, 0.05, 0.2)
    assert cfg.data_path == './IDRiD' and cfg.task == 'RETFound_mae_meh-IDRiD'
    assert cfg.finetune == 'RETFound_mae_meh' and cfg.lr is None


def test_recipe_defaults():
    cfg = resolve_config(['--data_path', 'x'])
    expected = dict(batch_size=16, epochs=100, accum_iter=1, model='retfound_mae', input_size=None, drop_path=0.2,
                    clip_grad=None, weight_decay=0.05, lr=None, blr=5e-3, layer_decay=0.65, min_lr=1e-6,
                    warmup_epochs=10.0, color_jitter=None, aa='rand-m9-mstd0.5-inc1', smoothing=0.1,
                    reprob=0.25, remode='pixel', recount=1, resplit=False, mixup=0.0, cutmix=0.0,
                    cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch', finetune='',
                    weights_dir='./weights', task='', global_pool=True, nb_classes=None, output_dir='./output_dir',
                    log_dir=None, device='auto', seed=0, resume='', start_epoch=0, eval=False, dist_eval=False,
                    num_workers=None, pin_mem=True, world_size=1, local_rank=-1, dist_on_itp=False,
                    dist_url='env://', savemodel=True, amp=False, amp_dtype='float16', print_freq=20)
    # toolkit additions (issue 3): their defaults leave the reference recipe unchanged
    additions = dict(save_last_every=1, async_save=False, jpeg_draft=False, crop_pct=None, freeze_backbone=False, opt='adamw', momentum=0.9, backbone_lr_scale=1.0, sched='cosine',
                     step_size=10, step_gamma=0.1, plateau_metric='', plateau_patience=10, plateau_factor=0.1,
                     train_aug='retfound', hflip=0.5, vflip=0.0, rotation=15.0, fundus_crop='none',
                     fov_threshold=10, preprocess_size=0, cache_dir='', task_type='', loss='auto',
                     class_weights=False, pos_weight=False, focal_alpha=None, focal_gamma=None, val_metric='',
                     tune_thresholds=None, per_class_report=False, balanced_sampler=False, data_format='',
                     image_col=None, label_cols=None, grade_col=None, split_col=None, val_ratio=0.15,
                     test_ratio=0.15, split_seed=0, image_root=None, left_col=None, right_col=None,
                     patient_col=None, eye_mode='dual', sheet=None, allow_outside_paths=False,
                     skip_image_check=False, patience=0, calibrate=False, explain=None,
                     # issue 12: the model family, adaptation and the evaluation protocol
                     model_arch=None, adaptation='finetune', lp_cached_features=False, lora_rank=8,
                     lora_alpha=16.0, lora_dropout=0.0, dataratio='1.0', stratified=False, seeds=0, kfold=0,
                     fold=None, external='')
    got = vars(cfg)
    for key, value in {**expected, **additions}.items():
        assert got[key] == value, key
        assert type(got[key]) is type(value), key
    # private keys (``_notes``: lines for the main process) are not flags and are not saved
    assert {k for k in got if not k.startswith('_')} == set(expected) | set(additions) | {'config', 'data_path'}


def test_precedence_default_yaml_cli(tmp_path):
    path = _yaml(tmp_path, "data_path: from_yaml\nbatch_size: 8\nblr: 1e-3\nglobal_pool: false\n"
                           "aa: ''\nclip_grad: 1\nremode: rand\nepochs: 50\n")
    cfg = resolve_config(['--config', path])
    assert (cfg.data_path, cfg.batch_size, cfg.blr, cfg.global_pool, cfg.aa) == ('from_yaml', 8, 1e-3, False, '')
    assert cfg.clip_grad == 1.0 and isinstance(cfg.clip_grad, float)
    assert cfg.remode == 'rand' and cfg.epochs == 50
    assert cfg.weight_decay == 0.05 and cfg.layer_decay == 0.65          # untouched defaults

    cfg = resolve_config(['--config', path, '--batch_size', '32', '--blr', '2e-3', '--global_pool',
                          '--data_path', 'cli', '--remode', 'pixel', '--aa', 'rand-m7'])
    assert (cfg.batch_size, cfg.blr, cfg.global_pool, cfg.data_path) == (32, 2e-3, True, 'cli')
    assert cfg.remode == 'pixel' and cfg.aa == 'rand-m7' and cfg.epochs == 50
    # a CLI value equal to the parser default still beats the YAML (explicit, not "differs from default")
    cfg = resolve_config(['--config', path, '--batch_size', '16', '--epochs', '100'])
    assert cfg.batch_size == 16 and cfg.epochs == 100
    # flag order does not matter
    cfg = resolve_config(['--batch_size', '4', '--config', path])
    assert cfg.batch_size == 4


def test_reference_negative_spellings(tmp_path):
    assert resolve_config(['--data_path', 'x', '--cls_token']).global_pool is False
    assert resolve_config(['--data_path', 'x', '--no-global_pool']).global_pool is False
    assert resolve_config(['--data_path', 'x', '--no_pin_mem']).pin_mem is False
    assert resolve_config(['--data_path', 'x', '--no-savemodel']).savemodel is False
    assert resolve_config(['--data_path', 'x', '--amp', '--eval']).amp is True
    path = _yaml(tmp_path, "data_path: d\nglobal_pool: false\n")
    assert resolve_config(['--config', path, '--global_pool']).global_pool is True
    path = _yaml(tmp_path, "data_path: d\ncls_token: true\nno_pin_mem: true\n", 'alias.yaml')
    cfg = resolve_config(['--config', path])
    assert cfg.global_pool is False and cfg.pin_mem is False


def test_yaml_number_strings_are_coerced(tmp_path):
    # PyYAML (YAML 1.1) reads 5e-4 and 1e2 as strings
    assert yaml.safe_load("lr: 5e-4")['lr'] == '5e-4'
    path = _yaml(tmp_path, "data_path: d\nlr: 5e-4\nmin_lr: 1e-7\nepochs: 1e2\nwarmup_epochs: 2\n"
                           "cutmix_minmax: null\nnb_classes: '5'\n")
    cfg = resolve_config(['--config', path])
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float)
    assert cfg.min_lr == 1e-7
    assert cfg.epochs == 100 and isinstance(cfg.epochs, int)
    assert cfg.warmup_epochs == 2.0 and isinstance(cfg.warmup_epochs, float)
    assert cfg.nb_classes == 5


@pytest.mark.parametrize('text,match', [
    ("batch_sise: 8\n", "did you mean 'batch_size'"),
    ("layerdecay: 0.5\n", "did you mean 'layer_decay'"),
    ("batch_size: 8.5\n", 'batch_size'),
    ("batch_size: true\n", 'batch_size'),
    ("epochs: many\n", 'epochs'),
    ("global_pool: maybe\n", 'true or false'),
    ("remode: pixl\n", "did you mean 'pixel'"),
    ("device: tpu\n", 'tpu'),
    ("batch_size: null\n", 'null is not allowed'),
    ("cutmix_minmax: 0.2\n", 'list of 2'),
    ("- a\n- b\n", 'mapping'),
    ("config: other.yaml\n", 'cannot name another preset'),
    ("a: [\n", 'not valid YAML'),
])
def test_bad_yaml_is_a_user_error(tmp_path, text, match):
    path = _yaml(tmp_path, "" + text)
    with pytest.raises(UserError, match=match):
        resolve_config(['--config', path, '--data_path', 'd'])


def test_unknown_key_message_format(tmp_path):
    path = _yaml(tmp_path, "data_path: d\nbatch_sise: 8\n")
    with pytest.raises(UserError) as err:
        resolve_config(['--config', path])
    msg = str(err.value)
    assert msg.startswith(f'--config {path}: unknown key') and 'batch_size' in msg


def test_missing_preset_file(tmp_path):
    with pytest.raises(UserError, match='file not found'):
        resolve_config(['--config', str(tmp_path / 'nope.yaml'), '--data_path', 'd'])


def test_cli_errors_are_user_errors_with_suggestions():
    with pytest.raises(UserError, match='did you mean --batch_size'):
        resolve_config(['--data_path', 'd', '--batch_sise', '3'])
    with pytest.raises(UserError, match='invalid choice'):
        resolve_config(['--data_path', 'd', '--remode', 'zeros'])
    with pytest.raises(UserError, match='invalid int'):
        resolve_config(['--data_path', 'd', '--epochs', '1.5'])
    with pytest.raises(UserError):  # no abbreviations: --warmup is not --warmup_epochs
        resolve_config(['--data_path', 'd', '--warmup', '3'])


def test_device_aliases():
    assert resolve_config(['--data_path', 'd', '--device', 'cuda']).device == 'gpu'
    assert resolve_config(['--data_path', 'd', '--device', 'CPU']).device == 'cpu'


@pytest.mark.parametrize('argv,match', [
    ([], '--data_path'),
    (['--batch_size', '0'], '--batch_size'),
    (['--epochs', '-1'], '--epochs'),
    (['--accum_iter', '0'], '--accum_iter'),
    (['--layer_decay', '1.5'], '--layer_decay'),
    (['--warmup_epochs', '-1'], '--warmup_epochs'),
    (['--mixup', '0.8'], 'not implemented'),
    (['--cutmix', '1.0'], 'not implemented'),
    (['--cutmix_minmax', '0.2', '0.8'], 'not implemented'),
    (['--drop_path', '1.0'], '--drop_path'),
    (['--lr', '0'], '--lr'),
    (['--lr', 'nan'], '--lr'),
    (['--clip_grad', '-1'], '--clip_grad'),
    (['--smoothing', '1.0'], '--smoothing'),
    (['--min_lr', '1e-2'], '--min_lr'),
    (['--start_epoch', '100'], '--start_epoch'),
    (['--nb_classes', '0'], '--nb_classes'),
])
def test_validation(argv, match):
    if argv:
        argv = ['--data_path', 'd'] + argv
    with pytest.raises(UserError, match=match):
        resolve_config(argv)


def test_validation_accepts_edge_values():
    cfg = resolve_config(['--data_path', 'd', '--epochs', '3', '--warmup_epochs', '3', '--layer_decay', '1',
                          '--warmup_epochs', '0.5', '--start_epoch', '100', '--epochs', '100', '--eval'])
    assert cfg.warmup_epochs == 0.5 and cfg.layer_decay == 1.0


def test_save_and_reload_round_trip(tmp_path):
    path = _yaml(tmp_path, "data_path: d\nlr: 5e-4\ncutmix_minmax: null\naa: ''\n")
    cfg = resolve_config(['--config', path, '--batch_size', '8', '--cls_token', '--clip_grad', '1.0',
                          '--nb_classes', '5', '--no_pin_mem'])
    out = save_config(cfg, str(tmp_path / 'run' / 'config.yaml'))
    assert os.listdir(tmp_path / 'run') == ['config.yaml']
    loaded = yaml.safe_load(open(out))
    assert loaded == config_to_dict(cfg) and 'config' not in loaded
    again = resolve_config(['--config', out])
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.global_pool is False and again.pin_mem is False and again.lr == 5e-4


def test_every_flag_is_settable_from_yaml(tmp_path):
    parser = get_args_parser()
    dests = {a.dest for a in parser._actions} - {'help', 'config'}
    saved = save_config(resolve_config(['--data_path', 'd']), str(tmp_path / 'c.yaml'))
    assert set(load_yaml_preset(saved)) == dests


@pytest.mark.parametrize('preset', sorted(f for f in os.listdir(os.path.join(ROOT,
                                                                             'configs')) if f.endswith('.yaml')))
def test_shipped_presets_resolve(preset):
    path = os.path.join(ROOT, 'configs', preset)
    cfg = resolve_config(['--config', path])
    assert cfg.data_path


def test_parser_help_mentions_launcher_note(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(['--help'])
    out = capsys.readouterr().out
    assert '--world_size' in out and 'ignored' in out and '--cls_token' in out


def _help_entries(parser):
    """{option strings: the help text --help shows for it}, defaults filled in as the formatter does."""
    fmt = parser._get_formatter()
    return {', '.join(a.option_strings): fmt._expand_help(a) if a.help else ''
            for a in parser._actions if a.option_strings}


def test_help_gives_every_option_a_text_and_at_most_one_default(monkeypatch, capsys):
    entries = _help_entries(get_args_parser())
    assert not [k for k, text in entries.items() if not text.strip()], 'options without help text'
    assert not {k: t for k, t in entries.items() if t.count('(default:') > 1}, 'default stated twice'
    assert not {k: t for k, t in entries.items() if '(default: None)' in t or '(default: )' in t}
    # the rendered page, at the usual width: no line says its default twice
    monkeypatch.setenv('COLUMNS', '100')
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(['--help'])
    lines = capsys.readouterr().out.splitlines()
    assert not [ln for ln in lines if ln.count('(default:') > 1]


def test_help_says_what_the_confusing_flags_do():
    entries = _help_entries(get_args_parser())
    # reference spellings that set another flag: no default of their own (it was "--cls_token (default: True)")
    for flag in ('--cls_token', '--no_pin_mem'):
        assert '(default:' not in entries[flag], entries[flag]
    assert 'cls token' in entries['--cls_token']
    # VisualDL records only; the run's files always go to the run folder (util/outputs/run_log.py)
    assert 'VisualDL' in entries['--log_dir'] and '(default: the run folder)' in entries['--log_dir']
    assert 'from the cores' in entries['--num_workers'] and '(default: 10)' not in entries['--num_workers']
    assert '(default: 0)' in entries['--patience'] and '--val_metric' in entries['--patience']
    description = get_args_parser().description
    assert 'multi-label' in description and 'regression' in description


def test_num_workers_default_comes_from_the_cores():
    # None in the config (so a saved config.yaml and the preset fixture do not depend on the machine);
    # util.threads.resolve_num_workers turns it into a count where the loaders are built
    assert resolve_config(['--data_path', 'd']).num_workers is None
    assert resolve_config(['--data_path', 'd', '--num_workers', '0']).num_workers == 0
    with pytest.raises(UserError, match='--num_workers -1: is negative'):
        resolve_config(['--data_path', 'd', '--num_workers', '-1'])


def test_patience_flag():
    assert resolve_config(['--data_path', 'd']).patience == 0
    assert resolve_config(['--data_path', 'd', '--patience', '5']).patience == 5
    with pytest.raises(UserError, match='--patience -1: is negative'):
        resolve_config(['--data_path', 'd', '--patience', '-1'])
    with pytest.raises(UserError, match='invalid int'):
        resolve_config(['--data_path', 'd', '--patience', '2.5'])


# ------------------------------------------------------------------------------------------------ shipped presets
CONFIGS = os.path.join(ROOT, 'configs')
PRESETS = sorted(f for f in os.listdir(CONFIGS) if f.endswith('.yaml'))
# resolved values of every preset, recorded by tools/make_presets_fixture.py
RESOLVED = os.path.join(FIXTURES, 'presets_resolved.json')


def _keys_at_default(path):
    """Keys of the preset at ``path`` whose value (typed as util.config types it) equals the parser default."""
    parser = get_args_parser()
    defaults = vars(parser.parse_args([]))
    return sorted(k for k, v in load_yaml_preset(path, parser).items() if v == defaults[k])


def test_keys_at_default_finds_values_equal_to_the_default(tmp_path):
    # epochs as 100, warmup_epochs as the int 10 (the default is 10.0), global_pool through its alias cls_token
    path = _yaml(tmp_path, 'data_path: d\nepochs: 100\nwarmup_epochs: 10\nblr: 1.0e-3\ncls_token: false\n'
                           'clip_grad: null\naa: "rand-m9-mstd0.5-inc1"\n')
    assert _keys_at_default(path) == ['aa', 'clip_grad', 'epochs', 'global_pool', 'warmup_epochs']


@pytest.mark.parametrize('preset', PRESETS)
def test_shipped_presets_set_only_non_default_values(preset):
    assert _keys_at_default(os.path.join(CONFIGS, preset)) == [], \
        f"configs/{preset}: these keys equal the default of main_finetune.py --help; remove them"


def test_shipped_presets_resolve_to_the_recorded_values():
    with open(RESOLVED, encoding='utf8') as f:
        recorded = json.load(f)
    assert sorted(recorded) == PRESETS, "a preset was added or removed: run tools/make_presets_fixture.py"
    for preset in PRESETS:
        got = json.loads(json.dumps(config_to_dict(resolve_config(['--config', os.path.join(CONFIGS, preset)]))))
        want = recorded[preset]
        assert got == want, (preset, {k: (want.get(k), got.get(k)) for k in set(got) | set(want)
                                      if want.get(k) != got.get(k)})
        # same types too (10 and 10.0 are equal but are not the same value in a saved config)
        assert {k: type(v).__name__ for k, v in got.items()} == {k: type(v).__name__ for k, v in want.items()}, preset
