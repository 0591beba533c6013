# Helpers shared by the agent scripts (inspect, apply, rollback). scripts.py puts this text in
# front of each of them: a request carries one script, so they cannot be loaded from a file.
# Windows PowerShell 5.1; the contract is docs/agent-protocol.md.
Set-StrictMode -Version 2
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

function Get-Field($Object, [string]$Name) {
    # Strict mode makes a missing property an error, and a request may leave fields out.
    # Callers wrap list fields in @(): PowerShell unrolls an array returned from a function.
    if ($null -eq $Object) { return $null }
    $property = $Object.PSObject.Properties[$Name]
    if ($null -eq $property) { return $null }
    return $property.Value
}

function New-AgentError([string]$Code, [string]$Message) {
    return [ordered]@{ code = $Code; message = $Message }
}

function New-AgentException([string]$Code, [string]$Message) {
    # Thrown for the failures the contract names, so one catch per item reports them all.
    $exception = [System.Exception]::new($Message)
    $exception.Data['agent_code'] = $Code
    return $exception
}

function ConvertTo-AgentError($ErrorRecord) {
    # .NET calls surface wrapped (MethodInvocationException and the like): the first exception
    # of the chain that says something precise decides the code.
    $exception = $ErrorRecord.Exception
    $code = 'internal'
    $message = $exception.GetBaseException().Message
    while ($null -ne $exception) {
        if ($exception.Data.Contains('agent_code')) {
            $code = [string]$exception.Data['agent_code']; $message = $exception.Message; break
        }
        if ($exception -is [System.UnauthorizedAccessException]) {
            $code = 'read-only'; $message = $exception.Message; break
        }
        if ($exception -is [System.IO.IOException]) {
            # The low word of the HRESULT is the Win32 error code.
            $win32 = $exception.HResult -band 0xFFFF
            # 32 sharing violation, 33 lock violation; 112 disk full, 39 handle disk full.
            if ($win32 -eq 32 -or $win32 -eq 33) { $code = 'locked'; $message = $exception.Message; break }
            if ($win32 -eq 112 -or $win32 -eq 39) { $code = 'disk-full'; $message = $exception.Message; break }
        }
        $exception = $exception.InnerException
    }
    # One line: the controller shows it as is.
    $oneLine = ($message -replace '\s+', ' ').Trim()
    return New-AgentError $code $oneLine
}

function Get-Sha256([byte[]]$Bytes) {
    $sha = [System.Security.Cryptography.SHA256]::Create()
    try { $digest = $sha.ComputeHash($Bytes) } finally { $sha.Dispose() }
    return ([BitConverter]::ToString($digest) -replace '-', '').ToLowerInvariant()
}

function Get-StateFolder([string]$Path) {
    return [IO.Path]::Combine([IO.Path]::GetDirectoryName($Path), '.provisioner', [IO.Path]::GetFileName($Path))
}

function Get-OwnedProcessId([string]$Name, [string]$Sid) {
    # By owner SID, never by window: a MicroSIP in another session has no window this
    # non-interactive WinRM session can see (the reason microsip.exe /exit cannot work here).
    $filter = "Name = '{0}'" -f $Name.Replace('\', '\\').Replace("'", "\'")
    foreach ($process in @(Get-CimInstance -ClassName Win32_Process -Filter $filter)) {
        $owner = $null
        try { $owner = Invoke-CimMethod -InputObject $process -MethodName GetOwnerSid } catch { $owner = $null }
        if ($null -eq $owner -or $owner.ReturnValue -ne 0) {
            # Gone in the meantime is fine; alive with an unknown owner is not, it may be the user's.
            if ($null -ne (Get-Process -Id $process.ProcessId -ErrorAction SilentlyContinue)) {
                $text = 'cannot tell who owns process {0} ({1}).' -f $process.ProcessId, $Name
                throw (New-AgentException 'internal' $text)
            }
        } elseif ($owner.Sid -eq $Sid) {
            [int]$process.ProcessId
        }
    }
}

function New-Acl([string]$Kind, [string]$Sid, [bool]$Folder) {
    # Explicit rules with inheritance cut, so the defaults of the profile or of Program Files
    # never widen access to the file (MicroSIP keeps passwords in it).
    if ($Folder) {
        $acl = [System.Security.AccessControl.DirectorySecurity]::new()
        $inherit = [System.Security.AccessControl.InheritanceFlags]'ContainerInherit, ObjectInherit'
    } else {
        $acl = [System.Security.AccessControl.FileSecurity]::new()
        $inherit = [System.Security.AccessControl.InheritanceFlags]::None
    }
    $acl.SetAccessRuleProtection($true, $false)
    $rights = [ordered]@{ 'S-1-5-18' = 'FullControl'; 'S-1-5-32-544' = 'FullControl' }
    if ($Kind -eq 'microsip') { $rights[$Sid] = 'FullControl' } else { $rights['S-1-5-32-545'] = 'ReadAndExecute' }
    foreach ($account in $rights.Keys) {
        $rule = [System.Security.AccessControl.FileSystemAccessRule]::new(
            [System.Security.Principal.SecurityIdentifier]::new($account),
            [System.Security.AccessControl.FileSystemRights]($rights[$account]),
            $inherit,
            [System.Security.AccessControl.PropagationFlags]::None,
            [System.Security.AccessControl.AccessControlType]::Allow)
        $acl.AddAccessRule($rule)
    }
    return $acl
}

function Set-StateAcl([string]$StateFolder, [string]$Kind, [string]$Sid) {
    # Backups arrive by rename and keep the ACL they had; every file here must get the file's.
    [IO.Directory]::SetAccessControl($StateFolder, (New-Acl $Kind $Sid $true))
    foreach ($file in [IO.Directory]::GetFiles($StateFolder)) {
        [IO.File]::SetAccessControl($file, (New-Acl $Kind $Sid $false))
    }
}

function Move-FileOver([string]$Source, [string]$Target) {
    # .NET Framework's File.Move cannot overwrite; File.Replace can, in one step.
    if ([IO.File]::Exists($Target)) { [IO.File]::Replace($Source, $Target, $null) }
    else { [IO.File]::Move($Source, $Target) }
}

function Move-ReplacementOver([string]$Replacement, [string]$Path, $Backup) {
    # $Backup is untyped on purpose: a [string] parameter turns $null into '', which
    # File.Replace rejects. The backup must sit on the same volume and its folder must exist.
    try {
        [IO.File]::Replace($Replacement, $Path, $Backup)
    } catch {
        $failure = $_
        # ERROR_UNABLE_TO_MOVE_REPLACEMENT_2 leaves the old file under the backup name only:
        # put it back so that the file always has its old or its new content.
        if ($null -ne $Backup -and -not [IO.File]::Exists($Path) -and [IO.File]::Exists($Backup)) {
            [IO.File]::Move($Backup, $Path)
        }
        throw $failure
    }
}

function Move-BackupsUp([string]$StateFolder) {
    # backup.2 -> backup.1, backup.3 -> backup.2, once backup.1 has been used.
    foreach ($n in 2, 3) {
        $from = [IO.Path]::Combine($StateFolder, "backup.$n")
        if ([IO.File]::Exists($from)) { Move-FileOver $from ([IO.Path]::Combine($StateFolder, "backup.$($n - 1)")) }
    }
}

function Move-BackupsDown([string]$StateFolder) {
    # backup.new (the content an apply replaced) becomes backup.1, the others moving down only
    # as far as the first free slot (backup.3, the oldest, goes when all three are taken): an
    # interrupted rotation then resumes without loss. Nothing moves without a backup.new.
    $pending = [IO.Path]::Combine($StateFolder, 'backup.new')
    if (-not [IO.File]::Exists($pending)) { return }
    $backup1 = [IO.Path]::Combine($StateFolder, 'backup.1')
    $backup2 = [IO.Path]::Combine($StateFolder, 'backup.2')
    $free = 3
    if (-not [IO.File]::Exists($backup1)) { $free = 1 } elseif (-not [IO.File]::Exists($backup2)) { $free = 2 }
    if ($free -ge 3) { Move-FileOver $backup2 ([IO.Path]::Combine($StateFolder, 'backup.3')) }
    if ($free -ge 2) { Move-FileOver $backup1 $backup2 }
    Move-FileOver $pending $backup1
}

function Remove-FileQuietly([string]$Path) {
    # Cleanup only: it must not hide the error that made it necessary.
    try { if ([IO.File]::Exists($Path)) { [IO.File]::Delete($Path) } } catch { }
}

function Remove-StaleTempFiles([string]$Folder, [string]$Name) {
    # .<name>.<12 hex>.tmp left by an agent that died before its replace: it may hold a
    # plaintext password. Best effort; matched exactly, so no other file is touched.
    if (-not [IO.Directory]::Exists($Folder)) { return }
    $pattern = '^\.' + [regex]::Escape($Name) + '\.[0-9a-f]{12}\.tmp$'
    foreach ($file in [IO.Directory]::GetFiles($Folder)) {
        if ([IO.Path]::GetFileName($file) -match $pattern) { Remove-FileQuietly $file }
    }
}

function Test-FileRequest($File) {
    # The fields apply and rollback need before touching anything; returns them checked.
    $kind = [string](Get-Field $File 'kind')
    $path = [string](Get-Field $File 'path')
    $sid = [string](Get-Field $File 'sid')
    if ($kind -ne 'microsip' -and $kind -ne 'override') {
        throw (New-AgentException 'internal' ("unknown file kind '{0}'." -f $kind))
    }
    if ([string]::IsNullOrEmpty($path) -or -not [IO.Path]::IsPathRooted($path)) {
        throw (New-AgentException 'internal' ("the path '{0}' is not absolute." -f $path))
    }
    if ($kind -eq 'microsip') {
        # Without the SID the ACL would lock the user out of their own file.
        if ([string]::IsNullOrEmpty($sid)) { throw (New-AgentException 'internal' 'a microsip file needs the user''s SID.') }
        $null = [System.Security.Principal.SecurityIdentifier]::new($sid)
    }
    return [ordered]@{ kind = $kind; path = $path; sid = $sid; exe = [string](Get-Field $File 'process') }
}

function Invoke-RunningPolicy($Checked, [string]$IfRunning, $Item) {
    # Returns $true when the file may be written. MicroSIP rewrites [Settings] from memory when
    # it exits, so a running instance would undo part of the push.
    if ($Checked.kind -ne 'microsip' -or [string]::IsNullOrEmpty($Checked.exe)) { return $true }
    $ids = @(Get-OwnedProcessId $Checked.exe $Checked.sid)
    if ($ids.Count -eq 0 -or $IfRunning -eq 'force') { return $true }
    if ($IfRunning -eq 'stop') {
        foreach ($id in $ids) {
            # Killed, not closed: a normal exit would first save [Settings] over the new file.
            try { Stop-Process -Id $id -Force } catch {
                if ($null -ne (Get-Process -Id $id -ErrorAction SilentlyContinue)) { throw }
            }
        }
        $Item['stopped'] = $ids.Count
        $deadline = [DateTime]::UtcNow.AddSeconds(5)
        do {
            if (@(Get-OwnedProcessId $Checked.exe $Checked.sid).Count -eq 0) { return $true }
            Start-Sleep -Milliseconds 200
        } while ([DateTime]::UtcNow -lt $deadline)
        $text = '{0} still runs for this user 5 s after being stopped.' -f $Checked.exe
    } else {
        $text = '{0} is running for this user ({1} process(es)).' -f $Checked.exe, $ids.Count
    }
    $Item['status'] = 'busy'
    $Item['error'] = New-AgentError 'busy' $text
    return $false
}

function New-RefusalAnswer([string]$Op, [string]$Message) {
    return [ordered]@{ protocol = 1; op = $Op; ok = $false; error = (New-AgentError 'internal' $Message) }
}

function Test-Request($Request, [string]$Op) {
    # Returns a refusal answer, or $null when the request is for this script and version.
    $protocol = Get-Field $Request 'protocol'
    if ($protocol -ne 1) { return New-RefusalAnswer $Op ('protocol {0} not supported' -f $protocol) }
    $requested = Get-Field $Request 'op'
    if ($requested -ne $Op) { return New-RefusalAnswer $Op ("this script runs '{0}', not '{1}'" -f $Op, $requested) }
    return $null
}
