import pytest

from factft.errors import FactftError
from factft.logging import to_log


def test_a_user_error_is_one_line_on_stderr_and_exit_status_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        with to_log(tmp_path / "job.log"):
            raise FactftError("dataset 'popqa': column 'subj' is missing")
    assert exited.value.code == 1
    assert capsys.readouterr().err == "factft: dataset 'popqa': column 'subj' is missing\n"
    text = (tmp_path / "job.log").read_text()
    assert "column 'subj' is missing" in text and "Traceback" not in text


def test_the_bitsandbytes_cpu_kernel_warning_stays_out_of_job_logs(tmp_path):
    import logging

    with to_log(tmp_path / "job.log"):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        logging.getLogger("factft.train").warning("a warning of ours")
    text = (tmp_path / "job.log").read_text()
    assert "gemm_4bit_forward" not in text and "a warning of ours" in text


def test_our_warnings_show_on_stderr_too_but_not_info_nor_other_libraries_warnings(tmp_path, capsys):
    import logging

    path = tmp_path / "job.log"
    with pytest.raises(SystemExit):
        with to_log(path):
            logging.getLogger("factft.sources").warning("11 answer cells look like lists")
            logging.getLogger("factft.sources").info("kept 17 of 17 rows")
            logging.getLogger("another_library").warning("a deprecation")
            raise FactftError("nothing is left")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"factft warning (log {path}): 11 answer cells look like lists", "factft: nothing is left"]
    text = path.read_text()
    assert "kept 17 of 17 rows" in text and "a deprecation" in text and text.count("11 answer cells") == 1
    logging.getLogger("factft.sources").warning("after the job")  # the job's handlers are gone
    assert capsys.readouterr().err == ""
