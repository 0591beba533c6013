# inspect: where MicroSIP and each user's ini are, and what they hold. Reads only.
$Request = $args[0]

function ConvertTo-FileState($Bytes) {
    if ($null -eq $Bytes) {
        return [ordered]@{ exists = $false; sha256 = $null; content_b64 = $null }
    }
    return [ordered]@{ exists = $true; sha256 = (Get-Sha256 $Bytes); content_b64 = [Convert]::ToBase64String($Bytes) }
}

function ConvertTo-AppliedState($Bytes, [bool]$Legacy) {
    if ($null -eq $Bytes) { return [ordered]@{ exists = $false; sha256 = $null; content_b64 = $null; legacy = $false } }
    return [ordered]@{ exists = $true; sha256 = (Get-Sha256 $Bytes); content_b64 = [Convert]::ToBase64String($Bytes); legacy = $Legacy }
}

function Test-ReadOnly([string]$Path) {
    if (-not [IO.File]::Exists($Path)) { return $false }
    return [bool]([IO.File]::GetAttributes($Path) -band [IO.FileAttributes]::ReadOnly)
}

function Get-RegistryText($Key, [string]$Name) {
    # The value as stored (REG_EXPAND_SZ not expanded), or $null.
    if ($null -eq $Key) { return $null }
    $value = $Key.GetValue($Name, $null, [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
    if ($null -eq $value) { return $null }
    return [string]$value
}

function Read-HiveValues($Root, [string]$Source) {
    # What the agent needs of a user's hive, through .NET keys closed at once: an open handle
    # would keep a hive loaded from a copy from unloading.
    $values = [ordered]@{ source = $Source; appdata = $null; microsip = $null; volatile = @{} }
    $key = $Root.OpenSubKey('Software\Microsoft\Windows\CurrentVersion\Explorer\User Shell Folders')
    try { $values.appdata = Get-RegistryText $key 'AppData' } finally { if ($null -ne $key) { $key.Dispose() } }
    $key = $Root.OpenSubKey('Software\MicroSIP')
    try { $values.microsip = Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
    $key = $Root.OpenSubKey('Volatile Environment')
    try {
        if ($null -ne $key) {
            foreach ($name in $key.GetValueNames()) {
                if (-not [string]::IsNullOrEmpty($name)) { $values.volatile[$name] = [string]$key.GetValue($name) }
            }
        }
    } finally { if ($null -ne $key) { $key.Dispose() } }
    return $values
}

function Invoke-Reg([string[]]$Arguments) {
    # reg.exe writes to stderr on failure; with ErrorActionPreference Stop that would throw
    # before its exit code could be read.
    $previous = $ErrorActionPreference
    $ErrorActionPreference = 'Continue'
    try { $output = @(& ([IO.Path]::Combine([Environment]::SystemDirectory, 'reg.exe')) $Arguments 2>&1) }
    finally { $ErrorActionPreference = $previous }
    if ($LASTEXITCODE -ne 0) {
        $text = ([string]::Join(' ', $output) -replace '\s+', ' ').Trim()
        throw (New-AgentException 'internal' ('reg {0} failed: {1}' -f $Arguments[0], $text))
    }
}

function Read-UserHive([string]$Sid, [string]$ProfilePath, [string]$Account) {
    # The user's own registry: HKU\<SID> while they are logged on. Logged off, a copy of their
    # NTUSER.DAT loaded under a name of ours (loading the file itself could make their next
    # logon fail). Never guessed: with AppData redirected, the local folder is a copy MicroSIP
    # does not read.
    $users = [Microsoft.Win32.Registry]::Users
    $loaded = $users.OpenSubKey($Sid)
    if ($null -ne $loaded) {
        try { return Read-HiveValues $loaded 'loaded' } finally { $loaded.Dispose() }
    }
    $hiveFile = [IO.Path]::Combine($ProfilePath, 'NTUSER.DAT')
    if (-not [IO.File]::Exists($hiveFile)) {
        throw (New-AgentException 'no-profile' ("{0} is logged off and their registry hive is not on this workstation (profile disk or roaming profile)." -f $Account))
    }
    $token = [Guid]::NewGuid().ToString('N')
    $temp = [IO.Path]::GetTempPath()
    $copy = [IO.Path]::Combine($temp, ('microsip-provisioner-{0}.dat' -f $token))
    $mount = 'MicroSIP-provisioner-' + $token
    try {
        # The hive with its transaction logs: a hive a crash left dirty needs them to load right.
        foreach ($suffix in '', '.LOG1', '.LOG2') {
            if ($suffix -ne '' -and -not [IO.File]::Exists($hiveFile + $suffix)) { continue }
            try {
                $source = [IO.FileStream]::new($hiveFile + $suffix, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]'ReadWrite, Delete')
            } catch {
                # Only a sharing violation passes (a logon or logoff); a DACL that denies the
                # agent (its owner may remove Administrators) stays until someone changes it.
                if (@(32, 33) -notcontains (Get-Win32Code $_)) {
                    throw (New-AgentException 'unsafe-path' ("cannot read the registry hive of {0}: {1}" -f $Account, $_.Exception.GetBaseException().Message))
                }
                throw (New-AgentException 'locked' ("The registry hive of {0} is in use (a logon or logoff is under way); try again." -f $Account))
            }
            try {
                $target = [IO.File]::Create($copy + $suffix)
                try { $source.CopyTo($target) } finally { $target.Dispose() }
            } finally { $source.Dispose() }
        }
        Invoke-Reg @('load', "HKU\$mount", $copy)
        try {
            $root = $users.OpenSubKey($mount)
            try { return Read-HiveValues $root 'offline' } finally { if ($null -ne $root) { $root.Dispose() } }
        } finally {
            Dismount-Hive $mount
        }
    } finally {
        Remove-HiveCopies $temp $token
    }
}

function Dismount-Hive([string]$Mount) {
    # Every handle to it closed first: one left open keeps the hive loaded until a reboot.
    for ($attempt = 1; $attempt -le 3; $attempt++) {
        [GC]::Collect(); [GC]::WaitForPendingFinalizers()
        try { Invoke-Reg @('unload', "HKU\$Mount"); return } catch {
            if ($attempt -eq 3) {
                throw (New-AgentException 'internal' ("could not unload the copy of a user's hive mounted as HKU\{0}: {1}" -f $Mount, $_.Exception.Message))
            }
            Start-Sleep -Milliseconds 200
        }
    }
}

function Remove-HiveCopies([string]$Folder, [string]$Token) {
    # The copies of users' hives: this request's, and any that an agent killed mid-way left
    # behind more than ten minutes ago (its mount unloaded first); a younger one may belong to
    # a request running now.
    $stale = [DateTime]::UtcNow.AddMinutes(-10)
    foreach ($leftover in @([IO.Directory]::GetFiles($Folder, 'microsip-provisioner-*.dat*'))) {
        $name = [IO.Path]::GetFileName($leftover)
        $mine = $name.StartsWith('microsip-provisioner-' + $Token)
        if (-not $mine -and [IO.File]::GetLastWriteTimeUtc($leftover) -gt $stale) { continue }
        $match = [regex]::Match($name, '^microsip-provisioner-([0-9a-f]{32})\.dat$')
        if (-not $mine -and $match.Success) {
            $mount = 'MicroSIP-provisioner-' + $match.Groups[1].Value
            $key = [Microsoft.Win32.Registry]::Users.OpenSubKey($mount)
            if ($null -ne $key) { $key.Dispose(); try { Dismount-Hive $mount } catch { } }
        }
        Remove-FileQuietly $leftover
    }
}

function Get-RoamingAppData($Hive, [string]$ProfilePath, [string]$Account) {
    $raw = $Hive.appdata
    if ([string]::IsNullOrEmpty($raw)) { $raw = '%USERPROFILE%\AppData\Roaming' }
    # Expanded with the target user's values: this session's own variables (USERPROFILE,
    # USERNAME, APPDATA) belong to the WinRM account and would point into its profile.
    $vars = @{ USERPROFILE = $ProfilePath }
    $parts = $Account.Split('\')
    if ($parts.Length -eq 2) { $vars['USERDOMAIN'] = $parts[0]; $vars['USERNAME'] = $parts[1] }
    foreach ($name in @($Hive.volatile.Keys)) { if (-not $vars.ContainsKey($name)) { $vars[$name] = $Hive.volatile[$name] } }
    $machine = Get-MachineVariables
    foreach ($name in @($machine.Keys)) { $vars[$name] = $machine[$name] }
    $expanded = Expand-Variables $raw $vars
    if ($expanded -match '%[^%\\]+%') {
        # Guessing would write an ini that MicroSIP never reads.
        throw (New-AgentException 'internal' ("cannot expand the AppData folder '{0}' for this user." -f $raw))
    }
    return $expanded
}

function Test-AppData([string]$AppData, [string]$ProfilePath, $Roots) {
    # The user writes their own User Shell Folders: their AppData is accepted only inside their
    # profile or under a redirection root the inventory allows. A share elsewhere is Folder
    # Redirection (reported); a local folder elsewhere may be another user's profile.
    try { $folder = Get-FullPathSafe $AppData } catch {
        throw (New-AgentException 'unsafe-path' ("the AppData folder '{0}' is not a plain absolute path." -f $AppData))
    }
    if (Test-Within $folder $ProfilePath) { return $folder }
    foreach ($root in @($Roots)) { if (Test-Within $folder $root) { return $folder } }
    if ($folder.StartsWith('\\')) {
        throw (New-AgentException 'redirected' ("AppData is redirected to {0}; MicroSIP reads its ini there. Allow that location with microsip.appdata_roots to write it." -f $folder))
    }
    throw (New-AgentException 'unsafe-path' ("AppData points to {0}, outside the profile {1}; set by the user, or a redirection to allow with microsip.appdata_roots." -f $folder, $ProfilePath))
}

function Get-ExeRegistryView([string]$ExePath) {
    # MicroSIP opens HKLM without KEY_WOW64_*: a 32-bit build reads the 32-bit view
    # (WOW6432Node). The PE header says which build this is.
    $view = [Microsoft.Win32.RegistryView]::Registry64
    try {
        $stream = [IO.File]::Open($ExePath, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
        try {
            $header = [byte[]]::new(1024)
            $count = $stream.Read($header, 0, $header.Length)
        } finally { $stream.Dispose() }
        if ($count -ge 64) {
            $pe = [BitConverter]::ToInt32($header, 60)
            if ($pe -gt 0 -and $pe + 6 -le $count -and $header[$pe] -eq 0x50 -and $header[$pe + 1] -eq 0x45) {
                if ([BitConverter]::ToUInt16($header, $pe + 4) -eq 0x14c) { $view = [Microsoft.Win32.RegistryView]::Registry32 }
            }
        }
    } catch { }
    return $view
}

function Get-ExeVersion([string]$ExePath) {
    # The FileVersion text of the exe's version resource, or $null. Whoever controls the file
    # wrote it (a per-user install is the user's): it is held open as a plain file (no link,
    # no other name) while read, and bounded; the controller parses it strictly.
    try {
        $held = Open-PlainFile $ExePath
        try { $text = [Diagnostics.FileVersionInfo]::GetVersionInfo($ExePath).FileVersion } finally { $held.Dispose() }
    } catch { return $null }
    if ($null -eq $text) { return $null }
    $text = [string]$text
    if ($text.Length -gt 64) { $text = $text.Substring(0, 64) }
    return $text
}

function Get-HklmMicroSip([string]$ExePath) {
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, (Get-ExeRegistryView $ExePath))
    try {
        $key = $base.OpenSubKey('SOFTWARE\MicroSIP')
        try { return Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
    } finally { $base.Dispose() }
}

function Get-MsiProducts([string]$Sid) {
    # What MsiEnumProducts lists for the user: per-machine products (S-1-5-18) and the user's own.
    $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, [Microsoft.Win32.RegistryView]::Registry64)
    try {
        foreach ($owner in @('S-1-5-18', $Sid)) {
            if ([string]::IsNullOrEmpty($owner)) { continue }
            $products = $base.OpenSubKey('SOFTWARE\Microsoft\Windows\CurrentVersion\Installer\UserData\' + $owner + '\Products')
            if ($null -eq $products) { continue }
            try {
                foreach ($name in $products.GetSubKeyNames()) {
                    $properties = $products.OpenSubKey($name + '\InstallProperties')
                    if ($null -eq $properties) { continue }
                    try {
                        [ordered]@{ name = [string](Get-RegistryText $properties 'DisplayName'); location = [string](Get-RegistryText $properties 'InstallLocation') }
                    } finally { $properties.Dispose() }
                }
            } finally { $products.Dispose() }
        }
    } finally { $base.Dispose() }
}

function Get-MicroSipMode($Hive, [string]$ExeDir, [string]$ExePath, [string]$Sid) {
    # MicroSIP 3.22.3's own rule (settings.cpp, AccountSettings::Init): the default value of
    # HKCU\Software\MicroSIP, else of HKLM\Software\MicroSIP; when that is empty or not the
    # exe's folder, the first MSI product named MicroSIP (its InstallLocation without a trailing
    # backslash, or the exe's folder when empty). Installed when the result equals the exe's
    # folder, compared case-insensitively and exactly.
    $hklm = Get-HklmMicroSip $ExePath
    $value = [string]$Hive.microsip; $rule = 'hkcu'
    if ([string]::IsNullOrEmpty($value)) { $value = [string]$hklm; $rule = 'hklm' }
    $detail = "HKCU='{0}' HKLM='{1}'" -f $Hive.microsip, $hklm
    if ([string]::IsNullOrEmpty($value) -or -not $value.Equals($ExeDir, [StringComparison]::OrdinalIgnoreCase)) {
        foreach ($product in @(Get-MsiProducts $Sid)) {
            if (-not $product.name.Equals('MicroSIP', [StringComparison]::OrdinalIgnoreCase)) { continue }
            if ([string]::IsNullOrEmpty($product.location)) { $value = $ExeDir; $rule = 'msi-any-location' }
            else { $value = $product.location.TrimEnd('\'); $rule = 'msi' }
            $detail += " MSI InstallLocation='{0}'" -f $product.location
            break
        }
    }
    if (-not [string]::IsNullOrEmpty($value) -and $value.Equals($ExeDir, [StringComparison]::OrdinalIgnoreCase)) {
        return [ordered]@{ mode = 'installed'; rule = $rule; detail = $detail }
    }
    return [ordered]@{ mode = 'portable'; rule = 'none'; detail = $detail }
}

function Find-MicroSip($Install) {
    # The inventory's folder if the exe is there, else the installer's markers: the default
    # value of HKLM\Software\MicroSIP (either registry view), then a per-machine MSI product.
    # A folder below a user's own variable (%LOCALAPPDATA%) is looked for per user.
    $exe = [string](Get-Field $Install 'exe')
    if ([string]::IsNullOrEmpty($exe)) { $exe = 'microsip.exe' }
    $candidates = @()
    $inventoryDir = [string](Get-Field $Install 'install_dir')
    if (-not [string]::IsNullOrEmpty($inventoryDir)) {
        $expanded = Expand-Variables $inventoryDir (Get-MachineVariables)
        if ($expanded -match '%[^%\\]+%') {
            return [ordered]@{ found = $true; dir = $null; exe_path = $null; source = 'inventory'; exe = $exe; per_user = $expanded }
        }
        $candidates += , [ordered]@{ source = 'inventory'; dir = $expanded }
    }
    foreach ($view in [Microsoft.Win32.RegistryView]::Registry64, [Microsoft.Win32.RegistryView]::Registry32) {
        $base = [Microsoft.Win32.RegistryKey]::OpenBaseKey([Microsoft.Win32.RegistryHive]::LocalMachine, $view)
        try {
            $key = $base.OpenSubKey('SOFTWARE\MicroSIP')
            try { $dir = Get-RegistryText $key '' } finally { if ($null -ne $key) { $key.Dispose() } }
        } finally { $base.Dispose() }
        if (-not [string]::IsNullOrEmpty($dir)) { $candidates += , [ordered]@{ source = 'registry'; dir = $dir } }
    }
    foreach ($product in @(Get-MsiProducts '')) {
        if ($product.name.Equals('MicroSIP', [StringComparison]::OrdinalIgnoreCase) -and -not [string]::IsNullOrEmpty($product.location)) {
            $candidates += , [ordered]@{ source = 'msi'; dir = $product.location }
        }
    }
    foreach ($candidate in $candidates) {
        $found = Find-ExeIn $candidate.dir $exe $candidate.source
        if ($null -ne $found) { return $found }
    }
    return [ordered]@{ found = $false; dir = $null; exe_path = $null; source = $null; exe = $exe; per_user = $null }
}

function Find-ExeIn([string]$Folder, [string]$Exe, [string]$Source) {
    $dir = $Folder.Trim().Trim('"').TrimEnd('\')
    try { $exePath = [IO.Path]::Combine($dir, $Exe) } catch { return $null }
    if (-not [IO.File]::Exists($exePath)) { return $null }
    return [ordered]@{ found = $true; dir = $dir; exe_path = $exePath; source = $Source; exe = $Exe; per_user = $null }
}

function Find-UserMicroSip($Install, $Hive, [string]$ProfilePath, [string]$AppData) {
    # A per-user folder expanded with the user's own variables; where the exe is not there, the
    # folder the user's own installer recorded (HKCU), then the machine's markers.
    if ($null -eq $Install.per_user) { return $Install }
    $vars = Get-MachineVariables
    $vars['USERPROFILE'] = $ProfilePath
    $vars['LOCALAPPDATA'] = [IO.Path]::Combine($ProfilePath, 'AppData', 'Local')
    $vars['APPDATA'] = $AppData
    $folder = Expand-Variables $Install.per_user $vars
    $candidates = @()
    if ($folder -notmatch '%[^%\\]+%') { $candidates += , [ordered]@{ source = 'inventory'; dir = $folder } }
    if (-not [string]::IsNullOrEmpty($Hive.microsip)) { $candidates += , [ordered]@{ source = 'hkcu'; dir = [string]$Hive.microsip } }
    foreach ($candidate in $candidates) {
        # The user writes their own HKCU and shell folders: only a local folder inside their
        # own profile is looked at (a share named there would make the agent's account
        # authenticate to a server of the user's choosing).
        $raw = [string]$candidate.dir
        try { $dir = Get-FullPathSafe ($raw.Trim().Trim('"')) } catch { continue }
        if ($dir.StartsWith('\\') -or -not (Test-Within $dir $ProfilePath)) { continue }
        # Nor one reached through a link: a junction to an object-manager link could still
        # lead to a share. Looked at with its folders locked.
        $locks = Lock-Folders ([IO.Path]::Combine($dir, $Install.exe)) $ProfilePath $null
        try { $found = Find-ExeIn $dir $Install.exe $candidate.source } finally { Unlock-Folders $locks }
        if ($null -ne $found) { return $found }
    }
    $machine = Find-MicroSip ([pscustomobject]@{ exe = $Install.exe })
    if ($machine.found) { return $machine }
    throw (New-AgentException 'not-installed' ("MicroSIP was not found in {0} for this user, nor by registry or MSI." -f $folder))
}

function Resolve-Account([string]$Account) {
    # NTAccount does not resolve '.': the local account '.\name' is '<COMPUTERNAME>\name'.
    $name = $Account
    if ($name.StartsWith('.\')) { $name = $env:COMPUTERNAME + $name.Substring(1) }
    try {
        return [System.Security.Principal.NTAccount]::new($name).Translate([System.Security.Principal.SecurityIdentifier])
    } catch {
        if ($_.Exception.GetBaseException() -is [System.Security.Principal.IdentityNotMappedException]) {
            throw (New-AgentException 'no-account' ("the Windows account {0} cannot be resolved to a SID." -f $Account))
        }
        throw
    }
}

function Get-UserState($User, $Install, [string]$Mode, $Roots, $Context) {
    $item = [ordered]@{
        name = (Get-Field $User 'name'); windows = (Get-Field $User 'windows')
        sid = $null; profile = $null; appdata = $null; path = $null
    }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $account = [string]$item.windows
        if ([string]::IsNullOrEmpty($account)) { throw (New-AgentException 'no-account' 'no Windows account is given for this user.') }
        $sidObject = Resolve-Account $account
        $sid = $sidObject.Value
        $item['sid'] = $sid
        # The canonical DOMAIN\name, as %USERNAME% and %USERDOMAIN% would give it at logon.
        $canonical = $account
        try { $canonical = $sidObject.Translate([System.Security.Principal.NTAccount]).Value } catch { $canonical = $account }
        $profilePath = Get-ProfilePath $sid
        if ([string]::IsNullOrEmpty($profilePath) -or -not [IO.Directory]::Exists($profilePath)) {
            throw (New-AgentException 'no-profile' ("{0} has no profile on this workstation (never logged on)." -f $account))
        }
        $profilePath = Get-FullPathSafe $profilePath
        $item['profile'] = $profilePath
        $hive = Read-UserHive $sid $profilePath $canonical
        $item['appdata'] = Get-RoamingAppData $hive $profilePath $canonical
        $allowed = @(Expand-AppDataRoots $Roots (Get-AccountVariables $sid $profilePath))
        $appData = Test-AppData $item['appdata'] $profilePath $allowed
        $item['appdata'] = $appData
        $perUser = $null -ne $Install.per_user
        $Install = Find-UserMicroSip $Install $hive $profilePath $appData
        # A per-user exe is read (its PE header) with its folders locked, as it was found.
        $exeLocks = $null
        if (Test-Within $Install.exe_path $profilePath) { $exeLocks = Lock-Folders $Install.exe_path $profilePath $null }
        try {
            $decided = Get-MicroSipMode $hive $Install.dir $Install.exe_path $sid
            # Each user's own exe for a per-user install; the machine's is in install.version.
            if ($perUser) { $item['exe_version'] = Get-ExeVersion $Install.exe_path }
        } finally { Unlock-Folders $exeLocks }
        $item['mode'] = $decided.mode; $item['mode_rule'] = $decided.rule; $item['mode_detail'] = $decided.detail
        if ($decided.mode -ne $Mode) {
            throw (New-AgentException 'mode-mismatch' ("MicroSIP runs {0} for this user (rule {1}: {2}); the inventory says {3}." -f $decided.mode, $decided.rule, $decided.detail, $Mode))
        }
        $iniName = [IO.Path]::GetFileNameWithoutExtension($Install.exe) + '.ini'
        if ($decided.mode -eq 'portable') { $path = [IO.Path]::Combine($Install.dir, $iniName) }
        else { $path = [IO.Path]::Combine($appData, 'MicroSIP', $iniName) }
        $item['path'] = $path
        $start = Get-CheckStart $path $sid $Roots
        Assert-OwnPath $path $sid
        # Gathered apart and added only once all is read: a user in error has no file fields.
        $file = ConvertTo-FileState (Read-CheckedFile $path $start)
        $readOnly = Test-ReadOnly $path
        $appliedBytes = Read-StateFile (Get-StateFolder $sid $iniName) 'applied'
        $legacy = $null -eq $appliedBytes
        if ($legacy) {
            $appliedBytes = Read-UserFile ([IO.Path]::Combine((Get-LegacyFolder $path), 'applied')) $start
        }
        $running = @(Get-OwnedProcessId $Context ([IO.Path]::GetFileName($Install.exe_path)) $sid).Count -gt 0
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['read_only'] = $readOnly
        $item['applied'] = ConvertTo-AppliedState $appliedBytes $legacy
        $item['running'] = $running
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

function Get-OverrideState($Install) {
    $item = [ordered]@{ path = $null }
    if ($null -ne $Install.per_user) {
        # No machine-wide folder: the enforced keys reach each user's file through the merge.
        $item['per_user'] = $true; $item['error'] = $null
        return $item
    }
    try {
        if (-not $Install.found) {
            throw (New-AgentException 'not-installed' 'MicroSIP was not found where the inventory says, nor by registry or MSI.')
        }
        $path = [IO.Path]::Combine($Install.dir, 'override.ini')
        $item['path'] = $path
        $file = ConvertTo-FileState (Read-CheckedFile $path (Get-CheckStart $path '' @()))
        $readOnly = Test-ReadOnly $path
        $applied = ConvertTo-AppliedState (Read-StateFile (Get-StateFolder '' 'override.ini') 'applied') $false
        foreach ($field in $file.Keys) { $item[$field] = $file[$field] }
        $item['read_only'] = $readOnly
        $item['applied'] = $applied
        $item['error'] = $null
    } catch {
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'inspect'
if ($null -ne $refusal) { return $refusal }

$freeBytes = $null
try { $freeBytes = [IO.DriveInfo]::new($env:SystemDrive).AvailableFreeSpace } catch { $freeBytes = $null }
$hostInfo = [ordered]@{
    computer = $env:COMPUTERNAME
    ps_version = $PSVersionTable.PSVersion.ToString()
    free_bytes = $freeBytes
    language_mode = [string]$ExecutionContext.SessionState.LanguageMode
}

$wanted = Get-Field $Request 'install'
$found = Find-MicroSip $wanted
$mode = [string](Get-Field $wanted 'mode')
if ([string]::IsNullOrEmpty($mode)) { $mode = 'installed' }
$roots = @(Get-Field $Request 'appdata_roots')
$installDir = $found.dir
if ($null -ne $found.per_user) { $installDir = $found.per_user }
$machineVersion = $null
if ($found.found -and $null -eq $found.per_user) { $machineVersion = Get-ExeVersion $found.exe_path }
$install = [ordered]@{ found = $found.found; dir = $installDir; exe_path = $found.exe_path; source = $found.source; per_user = ($null -ne $found.per_user); version = $machineVersion }
$context = @{ processes = $null }

$override = $null
if ([bool](Get-Field $Request 'override')) { $override = Get-OverrideState $found }

$users = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'users'
foreach ($user in @($requested)) {
    if ($null -ne $user) { $users.Add((Get-UserState $user $found $mode $roots $context)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one user.
return [ordered]@{
    protocol = 1; op = 'inspect'; ok = $true
    host = $hostInfo; install = $install; override = $override; users = $users.ToArray()
}
