"""What each widget class the module's .ui uses offers to Python in Slicer, for the static widget checks.

Slicer's Python reaches Qt objects through PythonQt, which exposes:

* Qt's own classes (QPushButton, QComboBox, ...) with their public methods (PythonQt's generated wrappers);
* CTK and Slicer classes (ctkCollapsibleButton, qMRMLNodeComboBox, ...) only through Qt's meta-object system:
  properties, signals, public slots and ``Q_INVOKABLE`` methods; a plain public C++ method is not callable;
* every Qt property as an attribute, *ahead of* a method of the same name: ``label.text`` is the text, so
  ``label.text()`` calls a string and fails (PythonQtClassInfo::member looks properties up before methods).
  Hence getters such as ``text()`` or ``count()`` are not listed as methods where a property has their name.

The members below come from the Qt 5.15 / Qt 6 class references, CTK's ``Libs/Widgets`` headers and Slicer's
``Libs/MRML/Widgets`` headers (qMRMLNodeComboBox.h, qMRMLWidget.h). They list what a scripted module plausibly
uses, not every overload; a class missing here makes the check report it rather than guess. Signals are written
as Qt normalises them for ``connect("signal(args)", slot)``: no ``const``, no ``&``, no argument names, and one
entry per default-argument form (``clicked()`` and ``clicked(bool)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class WidgetClass:
    """One class's own members (its base's are inherited)."""

    base: str | None
    properties: frozenset[str]
    read_only: frozenset[str]
    methods: frozenset[str]
    signals: frozenset[str]


def _widget_class(base: str | None, properties: str = "", read_only: str = "", methods: str = "", signals: str = ""):
    read_only_names = frozenset(read_only.split())
    return WidgetClass(
        base, frozenset(properties.split()) | read_only_names, read_only_names, frozenset(methods.split()),
        frozenset(normalized_signal(signal) for signal in signals.split()),
    )  # fmt: skip


def normalized_signal(signature: str) -> str:
    """``"textChanged(const QString &)"`` -> ``"textChanged(QString)"``, as QMetaObject::normalizedSignature does."""
    text = re.sub(r"\bconst\s+", "", signature).replace("&", "")
    return re.sub(r"\s+", "", text)


WIDGET_CLASSES: dict[str, WidgetClass] = {
    "QObject": _widget_class(
        None,
        properties="objectName",
        # connect/disconnect (signal string and callable), className, help and delete are PythonQt's own.
        methods="""blockSignals signalsBlocked children parent setParent findChild findChildren property setProperty
            dynamicPropertyNames deleteLater installEventFilter removeEventFilter inherits isWidgetType metaObject
            startTimer killTimer dumpObjectInfo dumpObjectTree setObjectName event eventFilter thread moveToThread
            tr connect disconnect className help delete""",
        signals="destroyed() destroyed(QObject*) objectNameChanged(QString)",
    ),
    "QWidget": _widget_class(
        "QObject",
        properties="""acceptDrops accessibleDescription accessibleName autoFillBackground baseSize contextMenuPolicy
            cursor enabled focusPolicy font geometry inputMethodHints layoutDirection locale maximumHeight maximumSize
            maximumWidth minimumHeight minimumSize minimumWidth mouseTracking palette pos size sizeIncrement sizePolicy
            statusTip styleSheet tabletTracking toolTip toolTipDuration updatesEnabled visible whatsThis
            windowFilePath windowFlags windowIcon windowModality windowModified windowOpacity windowTitle""",
        read_only="""childrenRect childrenRegion focus frameGeometry frameSize fullScreen height isActiveWindow
            maximized minimized minimumSizeHint modal normalGeometry rect sizeHint width x y""",
        methods="""actions activateWindow addAction addActions adjustSize backgroundRole childAt clearFocus close
            contentsMargins contentsRect ensurePolished focusProxy focusWidget fontMetrics foregroundRole grab
            grabKeyboard grabMouse hasFocus hasHeightForWidth heightForWidth hide insertAction insertActions
            isAncestorOf isEnabled isEnabledTo isFullScreen isHidden isMaximized isMinimized isModal isVisible
            isVisibleTo isWindow layout lower mapFrom mapFromGlobal mapFromParent mapTo mapToGlobal mapToParent move
            nextInFocusChain parentWidget previousInFocusChain releaseKeyboard releaseMouse removeAction render
            repaint resize setAcceptDrops setAttribute setAutoFillBackground setBackgroundRole setBaseSize
            setContentsMargins setContextMenuPolicy setCursor setDisabled setEnabled setFixedHeight setFixedSize
            setFixedWidth setFocus setFocusPolicy setFocusProxy setFont setForegroundRole setGeometry setHidden
            setLayout setLayoutDirection setLocale setMaximumHeight setMaximumSize setMaximumWidth setMinimumHeight
            setMinimumSize setMinimumWidth setMouseTracking setPalette setSizeIncrement setSizePolicy setStatusTip
            setStyle setStyleSheet setToolTip setToolTipDuration setUpdatesEnabled setVisible setWhatsThis
            setWindowFilePath setWindowFlags setWindowIcon setWindowModality setWindowModified setWindowOpacity
            setWindowTitle show showFullScreen showMaximized showMinimized showNormal stackUnder style testAttribute
            unsetCursor update updateGeometry winId window windowHandle""",
        signals="customContextMenuRequested(QPoint) windowIconChanged(QIcon) windowTitleChanged(QString)",
    ),
    "QFrame": _widget_class(
        "QWidget",
        properties="frameShadow frameShape frameRect lineWidth midLineWidth",
        read_only="frameWidth",
        methods="frameStyle setFrameRect setFrameShadow setFrameShape setFrameStyle setLineWidth setMidLineWidth",
    ),
    "QAbstractScrollArea": _widget_class(
        "QFrame",
        properties="horizontalScrollBarPolicy sizeAdjustPolicy verticalScrollBarPolicy",
        methods="""addScrollBarWidget cornerWidget horizontalScrollBar maximumViewportSize setCornerWidget
            setHorizontalScrollBar setHorizontalScrollBarPolicy setSizeAdjustPolicy setVerticalScrollBar
            setVerticalScrollBarPolicy setViewport verticalScrollBar viewport""",
    ),
    "QAbstractButton": _widget_class(
        "QWidget",
        properties="""autoExclusive autoRepeat autoRepeatDelay autoRepeatInterval checkable checked down icon iconSize
            shortcut text""",
        methods="""animateClick click group isCheckable isChecked isDown setAutoExclusive setAutoRepeat
            setAutoRepeatDelay setAutoRepeatInterval setCheckable setChecked setDown setIcon setIconSize setShortcut
            setText toggle""",
        signals="clicked() clicked(bool) pressed() released() toggled(bool)",
    ),
    "QPushButton": _widget_class(
        "QAbstractButton",
        properties="autoDefault default flat",
        methods="isDefault isFlat menu setAutoDefault setDefault setFlat setMenu showMenu",
    ),
    "QCheckBox": _widget_class(
        "QAbstractButton",
        properties="tristate",
        methods="checkState isTristate setCheckState setTristate",
        signals="stateChanged(int) checkStateChanged(Qt::CheckState)",
    ),
    "QLabel": _widget_class(
        "QFrame",
        properties="""alignment indent margin openExternalLinks pixmap scaledContents text textFormat
            textInteractionFlags wordWrap""",
        read_only="hasSelectedText selectedText",
        methods="""buddy clear hasScaledContents movie picture selectionStart setAlignment setBuddy setIndent setMargin
            setMovie setNum setOpenExternalLinks setPicture setPixmap setScaledContents setSelection setText
            setTextFormat setTextInteractionFlags setWordWrap""",
        signals="linkActivated(QString) linkHovered(QString)",
    ),
    "QLineEdit": _widget_class(
        "QWidget",
        properties="""alignment clearButtonEnabled cursorMoveStyle cursorPosition dragEnabled echoMode frame inputMask
            maxLength modified placeholderText readOnly text""",
        read_only="acceptableInput displayText hasSelectedText redoAvailable selectedText undoAvailable",
        methods="""addAction backspace clear completer copy createStandardContextMenu cursorBackward cursorForward
            cursorPositionAt cursorWordBackward cursorWordForward cut del deselect end hasAcceptableInput hasFrame
            home insert isClearButtonEnabled isModified isReadOnly isRedoAvailable isUndoAvailable paste redo
            selectAll selectionEnd selectionLength selectionStart setAlignment setClearButtonEnabled setCompleter
            setCursorMoveStyle setCursorPosition setDragEnabled setEchoMode setFrame setInputMask setMaxLength
            setModified setPlaceholderText setReadOnly setSelection setText setTextMargins setValidator textMargins
            undo validator""",
        signals="""cursorPositionChanged(int,int) editingFinished() inputRejected() returnPressed() selectionChanged()
            textChanged(QString) textEdited(QString)""",
    ),
    "QPlainTextEdit": _widget_class(
        "QAbstractScrollArea",
        properties="""backgroundVisible centerOnScroll cursorWidth documentTitle lineWrapMode maximumBlockCount
            overwriteMode placeholderText plainText readOnly tabChangesFocus tabStopDistance tabStopWidth
            textInteractionFlags undoRedoEnabled""",
        read_only="blockCount",
        methods="""anchorAt appendHtml appendPlainText canPaste centerCursor clear copy createStandardContextMenu
            currentCharFormat cursorForPosition cursorRect cut document ensureCursorVisible extraSelections find
            firstVisibleBlock insertPlainText isReadOnly isUndoRedoEnabled loadResource mergeCurrentCharFormat
            moveCursor paste print redo selectAll setBackgroundVisible setCenterOnScroll setCurrentCharFormat
            setCursorWidth setDocument setDocumentTitle setExtraSelections setLineWrapMode setMaximumBlockCount
            setOverwriteMode setPlaceholderText setPlainText setReadOnly setTabChangesFocus setTabStopDistance
            setTabStopWidth setTextCursor setTextInteractionFlags setUndoRedoEnabled setWordWrapMode textCursor
            toPlainText undo wordWrapMode zoomIn zoomOut""",
        signals="""blockCountChanged(int) copyAvailable(bool) cursorPositionChanged() modificationChanged(bool)
            redoAvailable(bool) selectionChanged() textChanged() undoAvailable(bool) updateRequest(QRect,int)""",
    ),
    "QProgressBar": _widget_class(
        "QWidget",
        properties="alignment format invertedAppearance maximum minimum orientation textDirection textVisible value",
        read_only="text",
        methods="""isTextVisible reset resetFormat setAlignment setFormat setInvertedAppearance setMaximum setMinimum
            setOrientation setRange setTextDirection setTextVisible setValue""",
        signals="valueChanged(int)",
    ),
    "QComboBox": _widget_class(
        "QWidget",
        properties="""currentIndex currentText duplicatesEnabled editable frame iconSize insertPolicy maxCount
            maxVisibleItems minimumContentsLength modelColumn placeholderText sizeAdjustPolicy""",
        read_only="count currentData",
        methods="""addItem addItems clear clearEditText completer findData findText hasFrame hidePopup insertItem
            insertItems insertSeparator isEditable itemData itemDelegate itemIcon itemText lineEdit model removeItem
            rootModelIndex setCompleter setCurrentIndex setCurrentText setDuplicatesEnabled setEditText setEditable
            setFrame setIconSize setInsertPolicy setItemData setItemDelegate setItemIcon setItemText setLineEdit
            setMaxCount setMaxVisibleItems setMinimumContentsLength setModel setModelColumn setPlaceholderText
            setRootModelIndex setSizeAdjustPolicy setValidator setView showPopup validator view""",
        # The QString forms of activated/highlighted/currentIndexChanged are Qt 5 only (Slicer built with Qt 5).
        signals="""activated(int) activated(QString) currentIndexChanged(int) currentIndexChanged(QString)
            currentTextChanged(QString) editTextChanged(QString) highlighted(int) highlighted(QString)
            textActivated(QString) textHighlighted(QString)""",
    ),
    "QAbstractSpinBox": _widget_class(
        "QWidget",
        properties="""accelerated alignment buttonSymbols correctionMode frame keyboardTracking readOnly
            showGroupSeparator specialValueText wrapping""",
        read_only="acceptableInput text",
        methods="""clear hasAcceptableInput hasFrame interpretText isAccelerated isGroupSeparatorShown isReadOnly
            selectAll setAccelerated setAlignment setButtonSymbols setCorrectionMode setFrame setGroupSeparatorShown
            setKeyboardTracking setReadOnly setSpecialValueText setWrapping stepBy stepDown stepUp""",
        signals="editingFinished()",
    ),
    "QSpinBox": _widget_class(
        "QAbstractSpinBox",
        properties="displayIntegerBase maximum minimum prefix singleStep stepType suffix value",
        read_only="cleanText",
        methods="""setDisplayIntegerBase setMaximum setMinimum setPrefix setRange setSingleStep setStepType setSuffix
            setValue""",
        signals="textChanged(QString) valueChanged(int) valueChanged(QString)",
    ),
    "QDoubleSpinBox": _widget_class(
        "QAbstractSpinBox",
        properties="decimals maximum minimum prefix singleStep stepType suffix value",
        read_only="cleanText",
        methods="""setDecimals setMaximum setMinimum setPrefix setRange setSingleStep setStepType setSuffix setValue
            textFromValue valueFromText""",
        signals="textChanged(QString) valueChanged(double) valueChanged(QString)",
    ),
    # CTK (Libs/Widgets): meta-object members only.
    "ctkCollapsibleButton": _widget_class(
        "QAbstractButton",
        properties="""buttonTextAlignment collapsed collapsedHeight contentsFrameShadow contentsFrameShape
            contentsLineWidth contentsMidLineWidth indicatorAlignment""",
        signals="contentsCollapsed(bool)",
    ),
    "ctkSliderWidget": _widget_class(
        "QWidget",
        properties="""decimals invertedAppearance invertedControls maximum minimum pageStep popupSlider prefix
            singleStep spinBoxAlignment spinBoxVisible suffix synchronizeSiblings tickInterval tickPosition tracking
            value""",
        methods="reset setDecimals setSpinBoxVisible setValue",
        signals="decimalsChanged(int) valueChanged(double) valueIsChanging(double)",
    ),
    # Slicer (Libs/MRML/Widgets): meta-object members only. qMRMLNodeComboBox is a QWidget, not a QComboBox.
    "qMRMLWidget": _widget_class(
        "QWidget",
        methods="mrmlScene pixmapFromIcon postInitializeApplication preInitializeApplication setMRMLScene",
        signals="mrmlSceneChanged(vtkMRMLScene*)",
    ),
    "qMRMLNodeComboBox": _widget_class(
        "QWidget",
        properties="""addEnabled baseName currentNodeID currentNodeId editEnabled hideChildNodeTypes
            interactionNodeSingletonTag noneDisplay noneEnabled nodeTypes removeEnabled renameEnabled
            selectNodeUponCreation showChildNodeTypes showHidden sizeAdjustPolicy""",
        methods="""addAttribute addMenuAction addNode currentNode editCurrentNode mrmlScene nodeCount nodeFromIndex
            nodeTypeLabel removeAttribute removeCurrentNode renameCurrentNode setCurrentNode setCurrentNodeID
            setCurrentNodeIndex setMRMLScene setNodeTypeLabel sortFilterProxyModel""",
        signals="""currentNodeChanged(vtkMRMLNode*) currentNodeChanged(bool) currentNodeIDChanged(QString)
            currentNodeRenamed(QString) nodeAboutToBeEdited(vtkMRMLNode*) nodeAboutToBeRemoved(vtkMRMLNode*)
            nodeActivated(vtkMRMLNode*) nodeAdded(vtkMRMLNode*) nodeAddedByUser(vtkMRMLNode*)
            nodeAddedByUserAction(vtkMRMLNode*)""",
    ),
}


def lineage(class_name: str) -> list[str]:
    """The class and its bases, nearest first; raises KeyError for a class the table does not describe."""
    names = []
    while class_name is not None:
        names.append(class_name)
        class_name = WIDGET_CLASSES[class_name].base
    return names


def members(class_name: str, kind: str) -> frozenset[str]:
    """All ``kind`` ("properties", "read_only", "methods" or "signals") of a class, inherited ones included."""
    return frozenset().union(*(getattr(WIDGET_CLASSES[name], kind) for name in lineage(class_name)))


def signal_names(class_name: str) -> frozenset[str]:
    """Signal names without arguments: PythonQt also exposes each signal as an attribute (``button.clicked``)."""
    return frozenset(signal.split("(", 1)[0] for signal in members(class_name, "signals"))
