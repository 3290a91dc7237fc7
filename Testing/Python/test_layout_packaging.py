"""The extension as the Extensions Index builds it: CMake lists every file and resource, the module test's data is
packaged, the icon, licence and requirements are right; and the checkers can fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from extension_checks import (
    EXTENSION_VARIABLES,
    ICON_FILE,
    MODULE_DIR,
    MODULE_FILE,
    MODULE_NAME,
    REPOSITORY,
    REQUIREMENTS_FILE,
    _cmake_code,
    cmake_commands,
    cmake_variable,
    listed_resources,
    png_size,
    resource_names_used,
    resource_problems,
    script_list_problems,
    stray_module_files,
)


# ----------------------------------------------------------------------------------------------- the repository


def test_every_python_file_of_the_module_is_listed_in_cmake_and_every_listed_file_exists():
    assert script_list_problems(MODULE_DIR) == []


def test_module_cmake_builds_a_scripted_module_with_generic_tests_and_registers_the_module_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    [build] = cmake_commands(text, "slicerMacroBuildScriptedModule")
    assert build[build.index("NAME") + 1] in ("${MODULE_NAME}", MODULE_NAME)
    assert "WITH_GENERIC_TESTS" in build
    assert "${MODULE_PYTHON_SCRIPTS}" in build
    code = _cmake_code(text)
    assert re.search(
        r"if\s*\(\s*BUILD_TESTING\s*\)\s*slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", code
    )


def test_every_listed_resource_exists_in_the_top_level_resources_folder():
    assert listed_resources(MODULE_DIR), "MODULE_PYTHON_RESOURCES is empty"
    assert resource_problems(MODULE_DIR) == []


def test_every_resource_the_module_asks_for_is_listed_for_packaging():
    used = resource_names_used(MODULE_FILE.read_text())
    assert {"UI/DeepSegModule.ui", "Icons/DeepSegModule.png", "requirements.txt"} <= used
    assert sorted(used - set(listed_resources(MODULE_DIR))) == []


def test_the_module_test_runs_on_the_bundled_test_data_and_all_of_it_is_packaged():
    """DeepSegModuleTest reads its model and brain pair from Resources/Testing; an unlisted file is not installed."""
    test_data = {
        path.relative_to(REPOSITORY / "Resources").as_posix()
        for path in (REPOSITORY / "Resources" / "Testing").rglob("*")
        if path.is_file()
    }
    assert test_data == {
        "Testing/BrainPair/fixed.nrrd", "Testing/BrainPair/moving.nrrd", "Testing/BrainPair/motion.json",
        "Testing/BrightSphere/bright-sphere.ts", "Testing/BrightSphere/deepseg.json",
    }  # fmt: skip
    assert test_data <= resource_names_used(MODULE_FILE.read_text())
    assert test_data <= set(listed_resources(MODULE_DIR))


def test_module_cmake_copies_and_installs_resources_next_to_the_module_scripts():
    """Resources must land in <qt-scripted-modules>/Resources, where resource_path() looks in a package."""
    code = _cmake_code((MODULE_DIR / "CMakeLists.txt").read_text())
    assert re.search(r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/\$\{_resource\}", code)
    assert re.search(r"DESTINATION\s+\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/", code)
    assert "/../Resources" in code


def test_top_level_cmake_declares_the_extension():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    assert cmake_commands(text, "cmake_minimum_required")
    assert cmake_commands(text, "project") == [["DeepSeg"]]
    for variable in EXTENSION_VARIABLES:
        values = cmake_variable(text, variable)
        assert values and all(value.strip() for value in values), f"{variable} is empty"
    assert cmake_variable(text, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert "PyTorch" in cmake_variable(text, "EXTENSION_DEPENDS")[0].split(";")
    assert ["Slicer", "REQUIRED"] in cmake_commands(text, "find_package")
    includes = [args[0] for args in cmake_commands(text, "include")]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert ["DeepSegModule"] in cmake_commands(text, "add_subdirectory")
    # Slicer's ExtensionWizard inserts new modules at this exact line.
    assert "## NEXT_MODULE" in text.splitlines()


def test_extension_icon_and_screenshot_urls_point_at_committed_files():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    homepage = cmake_variable(text, "EXTENSION_HOMEPAGE")[0]
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", homepage)
    assert match, f"homepage {homepage} is not a GitHub repository"
    raw_prefix = f"https://raw.githubusercontent.com/{match[1]}/{match[2]}/main/"
    [icon_url] = cmake_variable(text, "EXTENSION_ICONURL")
    assert icon_url.startswith(raw_prefix), "the catalog downloads the icon: it must be a raw URL in this repository"
    assert (REPOSITORY / icon_url.removeprefix(raw_prefix)).is_file()
    for screenshot_url in cmake_variable(text, "EXTENSION_SCREENSHOTURLS")[0].split():
        assert screenshot_url.startswith(raw_prefix) and screenshot_url.endswith((".png", ".jpg", ".gif"))
        assert (REPOSITORY / screenshot_url.removeprefix(raw_prefix)).is_file()



def test_icon_is_a_128_pixel_square_png():
    assert png_size(ICON_FILE) == (128, 128)


def test_license_is_apache_2():
    text = (REPOSITORY / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "http://www.apache.org/licenses/" in text


def test_no_other_python_file_sits_next_to_the_module_file():
    assert stray_module_files(MODULE_DIR) == []


def test_requirements_parse_and_leave_torch_and_simpleitk_to_slicer():
    from packaging.requirements import Requirement

    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS_FILE.read_text().splitlines()]
    names = {Requirement(line).name.lower() for line in lines if line}
    assert "monai" in names
    assert not names & {"torch", "simpleitk"}, "torch comes from the PyTorch extension; Slicer bundles SimpleITK"


def test_resource_path_finds_packaged_and_checkout_layouts_and_names_both_when_missing(tmp_path: Path):
    from DeepSegModuleLib.resources import resource_path

    packaged = tmp_path / "lib" / "Slicer-5.13" / "qt-scripted-modules"  # DeepSegModule.py sits here
    (packaged / "Resources" / "UI").mkdir(parents=True)
    (packaged / "Resources" / "UI" / "DeepSegModule.ui").write_text("<ui/>")
    assert resource_path("UI/DeepSegModule.ui", packaged) == packaged / "Resources" / "UI" / "DeepSegModule.ui"

    checkout = tmp_path / "repo" / MODULE_NAME
    (checkout.parent / "Resources").mkdir(parents=True)
    (checkout.parent / "Resources" / "requirements.txt").write_text("monai\n")
    assert resource_path("requirements.txt", checkout) == checkout.parent / "Resources" / "requirements.txt"

    with pytest.raises(FileNotFoundError) as missing:
        resource_path("Icons/DeepSegModule.png", checkout)
    assert str(checkout / "Resources" / "Icons") in str(missing.value)
    assert str(checkout.parent / "Resources" / "Icons") in str(missing.value)
    with pytest.raises(ValueError):
        resource_path("../LICENSE", checkout)



# ----------------------------------------------------------------------------------------------- the checkers can fail


def test_script_check_catches_an_unlisted_file_and_a_stale_entry(broken_copy: Path):
    (broken_copy / "DeepSegModuleLib" / "forgotten.py").write_text("")
    (broken_copy / "DeepSegModuleLib" / "resources.py").unlink()
    problems = script_list_problems(broken_copy)
    assert any("forgotten.py is not listed" in problem for problem in problems)
    assert any("resources.py is listed" in problem for problem in problems)


def test_resource_check_catches_a_missing_resource(broken_copy: Path):
    missing = broken_copy.parent / "Resources" / "requirements.txt"
    missing.unlink()
    assert resource_problems(broken_copy) == [f"resource requirements.txt is listed but {missing} does not exist"]



def test_stray_file_check_catches_a_helper_next_to_the_module_file(broken_copy: Path):
    (broken_copy / "helpers.py").write_text("")
    assert stray_module_files(broken_copy) == ["helpers.py"]
